"""How a model builder takes a hyperparameter: fixed, learned by type-II, or given a hyperprior.

A builder accepts, for each hyperparameter, a number (fixed), ``None`` (a ``pyro.param`` learned by
type-II maximisation of the evidence), or a ``pyro.distributions.Distribution`` (a hyperprior: an
ordinary ``pyro.sample`` site). Inside the Pyro program :func:`hyperparameter_site` turns the
resolved choice into the right primitive.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from bmm_ppl.validation import check_positive


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A hyperparameter held at ``value``."""

    value: Union[float, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Learned:
    """A hyperparameter learned by type-II maximisation, starting from ``init``."""

    init: float = 1.0


@dataclasses.dataclass(frozen=True)
class Hyperprior:
    """A hyperparameter integrated out under the distribution ``prior``."""

    prior: dist.Distribution


HyperparameterSpec = Union[Fixed, Learned, Hyperprior]


def as_hyperparameter(name: str, spec, positive: bool = True) -> HyperparameterSpec:
    """Resolves a builder argument: number -> :class:`Fixed`, ``None`` -> :class:`Learned`,
    distribution -> :class:`Hyperprior`; an already resolved spec passes through.

    Examples:
        >>> as_hyperparameter("alpha", 5e-3)
        Fixed(value=0.005)
        >>> as_hyperparameter("beta", None)
        Learned(init=1.0)
    """
    if isinstance(spec, (Fixed, Learned, Hyperprior)):
        resolved = spec
    elif spec is None:
        resolved = Learned()
    elif isinstance(spec, torch.distributions.Distribution):
        resolved = Hyperprior(spec)
    elif isinstance(spec, (int, float, torch.Tensor)):
        resolved = Fixed(float(spec) if isinstance(spec, (int, float)) else spec)
    else:
        raise TypeError(
            f"{name} must be a number (fixed), None (learned by type-II) or a distribution (hyperprior), "
            f"got {type(spec).__name__}"
        )
    if positive and isinstance(resolved, Fixed):
        check_positive(name, resolved.value)
    if positive and isinstance(resolved, Learned):
        check_positive(f"{name} initial value", resolved.init)
    return resolved


def hyperparameter_site(name: str, spec: HyperparameterSpec, like: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """The hyperparameter's value inside a Pyro program, on the device and dtype of ``like``.

    A :class:`Learned` spec becomes ``pyro.param(name, init, constraint=positive)``, a
    :class:`Hyperprior` becomes ``pyro.sample(name, prior)``, a :class:`Fixed` spec a constant. A
    hyperparameter is real-valued: where ``like`` is an integer tensor (integer data) it takes the default
    float dtype instead, so that ``beta=1.9`` is never truncated to 1.

    Examples:
        >>> hyperparameter_site("beta", Fixed(1.9), like=torch.arange(3))
        tensor(1.9000)
    """
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    if isinstance(spec, Fixed):
        return torch.as_tensor(spec.value, dtype=dtype, device=like.device)
    if isinstance(spec, Learned):
        init = torch.as_tensor(spec.init, dtype=dtype, device=like.device)
        return pyro.param(name, init, constraint=constraints.positive if positive else constraints.real)
    return pyro.sample(name, spec.prior)
