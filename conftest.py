"""Shared by every test item, the README's and the modules' doctests included: each starts from the same
random state and an empty parameter store, whichever worker runs it and whatever ran before (pytest-xdist
spreads the items over processes in no fixed order)."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _seed_and_clean_param_store():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
