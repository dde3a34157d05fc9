"""Turning the ``guide=`` argument of :class:`~bmm_ppl.inference.SVI` into a guide for one model.

A guide may be given as a short name (``"normal"``, ``"mvn"``, ``"lowrank"``, ``"delta"``), a Pyro
autoguide class, an autoguide instance already built on the model, or any Pyro guide function with the
model's signature.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import pyro.infer.autoguide as autoguide
import pyro.poutine as poutine
import torch

from bmm_ppl._enums import StrEnum
from bmm_ppl.inference.latents import LATENT_DISTRIBUTIONS, LatentDistribution
from bmm_ppl.inference.program.enumeration import draw_discrete
from bmm_ppl.inference.program.sites import robust_init

_DRAW_PLATE = "_bmm_guide_draws"


class GuideName(StrEnum):
    """Short names of the autoguides :class:`~bmm_ppl.inference.SVI` builds itself."""

    NORMAL = "normal"  # AutoNormal: mean-field Gaussian
    MVN = "mvn"  # AutoMultivariateNormal: full-rank Gaussian
    LOWRANK = "lowrank"  # AutoLowRankMultivariateNormal
    DELTA = "delta"  # AutoDelta: a point estimate (MAP), no evidence bound

    @property
    def autoguide_class(self) -> type:
        return {
            GuideName.NORMAL: autoguide.AutoNormal,
            GuideName.MVN: autoguide.AutoMultivariateNormal,
            GuideName.LOWRANK: autoguide.AutoLowRankMultivariateNormal,
            GuideName.DELTA: autoguide.AutoDelta,
        }[self]


def is_guide_function(guide) -> bool:
    """Whether ``guide`` is the user's own guide (a function or an ``AutoGuide`` instance), not a name or
    an ``AutoGuide`` class that :func:`resolve_guide` builds on the model."""
    return not isinstance(guide, (str, GuideName, type)) and callable(guide)


def guide_site_names(guide: Callable, args: tuple, kwargs: dict) -> set:
    """The sample sites one run of ``guide`` draws (a scoped parameter store, the random state kept)."""
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return {name for name, site in trace.nodes.items() if site["type"] == "sample"}


def resolve_guide(guide, model: Callable) -> Callable:
    """The guide to fit for ``model``.

    Args:
        guide: a :class:`GuideName` or its string, an ``AutoGuide`` subclass (built here on ``model``), an
            ``AutoGuide`` instance (used as is), or a guide function ``guide(*args, **kwargs)``.
        model: the Pyro program.

    Returns:
        A callable guide. Classes and names give a fresh guide per call, so that fits share no state.

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> def model(): pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> type(resolve_guide("mvn", model)).__name__
        'AutoMultivariateNormal'
    """
    if isinstance(guide, (str, GuideName)):
        return GuideName.parse(guide, "guide").autoguide_class(model, init_loc_fn=robust_init)
    if isinstance(guide, type):
        if issubclass(guide, autoguide.AutoGuide):
            return guide(model, init_loc_fn=robust_init)
        raise TypeError(f"guide must be an AutoGuide subclass when given as a class, got {guide.__name__}")
    if callable(guide):
        return guide
    choices = ", ".join(repr(m.value) for m in GuideName)
    raise TypeError(
        f"guide must be one of {choices}, an AutoGuide class or instance, or a guide function; "
        f"got {type(guide).__name__}"
    )


def is_point_mass(guide: Callable) -> bool:
    """True for guides with no entropy (``AutoDelta``): their "ELBO" bounds nothing."""
    return isinstance(guide, autoguide.AutoDelta)


def _sample_sites(
    guide: Callable, args: tuple, kwargs: dict, num_samples: int, site_shapes: dict, max_plate_nesting: int, device
) -> dict[str, torch.Tensor]:
    """Runs ``guide`` once under a plate of ``num_samples`` draws and returns ``{site: Tensor[S, *shape]}``."""
    with pyro.plate(_DRAW_PLATE, num_samples, dim=-max_plate_nesting - 1, device=device):
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    out = {}
    for name, shape in site_shapes.items():
        value = trace.nodes[name]["value"]
        size = math.prod(shape)
        if value.numel() == num_samples * size:
            out[name] = value.reshape((num_samples,) + shape)
        elif value.numel() == size:  # a site the guide holds fixed (e.g. a point mass on a constant)
            out[name] = value.reshape(shape).expand((num_samples,) + shape)
        else:
            raise ValueError(f"guide site {name!r} came out as {tuple(value.shape)} under {num_samples} draws")
    return out


class GuideLatents(LatentDistribution):
    """The fitted variational distribution of an SVI run: draws come from running its guide.

    Sampling runs the guide once, vectorised under a plate of draws, inside the fit's own parameter
    store (so other fits' parameters never leak in). The guide is code, so it is not saved: the state
    dict *materialises* ``num_saved_draws`` draws, and a loaded posterior draws from those
    (:class:`StoredDrawLatents`). ``to()`` does the same.

    Args:
        guide: the fitted guide.
        args: the model's positional arguments the guide is called with.
        kwargs: the model's keyword arguments the guide is called with.
        param_state: the fit's parameter-store state (``ParamStoreDict.get_state()``).
        site_shapes: ``{site: shape}`` of the model's latent sites.
        max_plate_nesting: the model's plate depth; draws go in a plate to its left.
        num_saved_draws: how many draws the state dict keeps.
        discrete: ``(model, sites)`` for a model whose discrete ``sites`` were enumerated out: each draw of
            the guide's sites is completed by a draw of those from their conditional posterior
            (:func:`~bmm_ppl.inference.program.enumeration.draw_discrete`).
    """

    kind = "guide"

    def __init__(self, guide, args, kwargs, param_state, site_shapes, max_plate_nesting, num_saved_draws: int = 4000,
                 discrete: tuple | None = None):
        self.guide = guide
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.param_state = param_state
        self.site_shapes = {name: tuple(int(s) for s in shape) for name, shape in site_shapes.items()}
        self.max_plate_nesting = int(max_plate_nesting)
        self.num_saved_draws = int(num_saved_draws)
        self.discrete = discrete
        self._saved: StoredDrawLatents | None = None

    @property
    def device(self) -> torch.device:
        return next(iter(self.param_state["params"].values())).device

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        with pyro.get_param_store().scope(self.param_state), torch.no_grad():
            draws = _sample_sites(
                self.guide, self.args, self.kwargs, int(num_samples), self.site_shapes, self.max_plate_nesting, self.device
            )
            if self.discrete is not None:
                model, sites = self.discrete
                draws.update(draw_discrete(model, self.args, self.kwargs, draws, sites, num_draws=int(num_samples)))
            return draws

    def materialise(self) -> "StoredDrawLatents":
        """``num_saved_draws`` fixed draws (drawn once, then cached)."""
        if self._saved is None:
            self._saved = StoredDrawLatents(self.sample(self.num_saved_draws))
        return self._saved

    def state_dict(self) -> dict:
        return self.materialise().state_dict()

    @classmethod
    def from_state_dict(cls, state: dict) -> "StoredDrawLatents":
        return StoredDrawLatents.from_state_dict(state)

    def to(self, device=None, dtype=None) -> "StoredDrawLatents":
        return self.materialise().to(device, dtype)


class StoredDrawLatents(LatentDistribution):
    """A fixed set of draws, resampled: ``sample(n)`` takes ``n`` of them at random, without replacement
    while ``n`` does not exceed the number stored, with replacement beyond.

    Args:
        draws: ``{site: Tensor[S, *site_shape]}``.

    Examples:
        >>> q = StoredDrawLatents({"w": torch.randn(100, 2)})
        >>> q.sample(10)["w"].shape
        torch.Size([10, 2])
    """

    kind = "draws"

    def __init__(self, draws: dict[str, torch.Tensor]):
        if not draws:
            raise ValueError("StoredDrawLatents needs at least one site")
        sizes = {name: value.shape[0] for name, value in draws.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every site needs the same number of draws, got {sizes}")
        self.draws = dict(draws)
        self.site_shapes = {name: tuple(value.shape[1:]) for name, value in draws.items()}
        self.num_draws = next(iter(sizes.values()))

    def sample(self, num_samples: int) -> dict[str, torch.Tensor]:
        some = next(iter(self.draws.values()))
        if num_samples <= self.num_draws:
            index = torch.randperm(self.num_draws, device=some.device)[:num_samples]
        else:
            index = torch.randint(self.num_draws, (num_samples,), device=some.device)
        return {name: value[index] for name, value in self.draws.items()}

    def state_dict(self) -> dict:
        flat = torch.cat([value.reshape(self.num_draws, -1) for value in self.draws.values()], dim=1)
        return {
            "kind": self.kind,
            "site_names": list(self.draws),
            "draws": list(self.draws.values()),
            # the mean of the flattened sites, so that readers can learn the device and dtype
            "loc": flat.mean(0),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "StoredDrawLatents":
        return cls(dict(zip(state["site_names"], state["draws"])))

    def to(self, device=None, dtype=None) -> "StoredDrawLatents":
        return StoredDrawLatents({n: v.to(device=device, dtype=dtype) for n, v in self.draws.items()})


LATENT_DISTRIBUTIONS.setdefault(StoredDrawLatents.kind, StoredDrawLatents)
