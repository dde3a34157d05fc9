"""GPyTorch, imported without the import-time ``torch.jit.script`` DeprecationWarning of linear_operator.

linear_operator decorates functions with ``torch.jit.script`` at import, which torch 2.13 deprecates;
the warning is attributed to ``torch.jit`` so the test suite's ``linear_operator.*`` filter misses it.
It is a third-party import-time notice, silenced here once, by message, and nowhere else.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
    import gpytorch  # noqa: F401
    import linear_operator  # noqa: F401

__all__ = ["gpytorch", "linear_operator"]
