"""A model's potential and gradient on a minibatch, with the minibatch as an input of one captured graph.

Stochastic-gradient samplers evaluate ``U_b(z) = -(n / b) log p(batch | z) - log p(z) - log |det dT/dz|`` at
a new minibatch every step. Re-running the Pyro model through its handlers for every step costs more
than the arithmetic; :func:`compiled_minibatch_potential_and_grad` records the forward and backward pass
once as a graph of tensor operations whose inputs are ``z`` AND the minibatch tensors, so one capture
serves every minibatch of the same size (the ``n / b`` scale is a constant of the graph).

:class:`DataSplit` says which of the model's arguments are data to subsample (tensors whose first
dimension is the data size) and rebuilds ``(args, kwargs)`` around a minibatch of them;
:func:`with_observed_scale` scales the observations' log-likelihood by ``n / b`` and leaves the prior alone.
"""

from __future__ import annotations

import copy
import dataclasses

import pyro
from pyro.poutine.messenger import Messenger
import torch

from bmm_ppl.inference.program.graph_capture import capture
from bmm_ppl.inference.program.potential import ModelPotential


@dataclasses.dataclass(frozen=True)
class DataSplit:
    """Which tensor arguments of ``model(*args, **kwargs)`` hold one row per data point.

    Args:
        args, kwargs: the model's arguments.
        size: the data size ``n``; every tensor argument whose first dimension is ``n`` is data.

    Example:
        >>> split = DataSplit.of((torch.zeros(5, 2), 3), {"y": torch.ones(5)}, size=5)
        >>> batch = tuple(t[:2] for t in split.tensors((torch.zeros(5, 2), 3), {"y": torch.ones(5)}))
        >>> args, kwargs = split.rebuild((torch.zeros(5, 2), 3), {"y": torch.ones(5)}, batch)
        >>> args[0].shape, args[1], kwargs["y"].shape
        (torch.Size([2, 2]), 3, torch.Size([2]))
    """

    positions: tuple
    names: tuple
    size: int

    @classmethod
    def of(cls, args: tuple, kwargs: dict, size: int) -> "DataSplit":
        def is_data(value):
            return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size

        return cls(tuple(i for i, a in enumerate(args) if is_data(a)),
                   tuple(k for k, v in kwargs.items() if is_data(v)), size)

    def tensors(self, args: tuple, kwargs: dict) -> tuple:
        """The data tensors, positional ones first: ``tuple[Tensor[n, ...]]``."""
        return tuple(args[i] for i in self.positions) + tuple(kwargs[k] for k in self.names)

    def rebuild(self, args: tuple, kwargs: dict, batch: tuple) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the data tensors replaced by ``batch`` (in :meth:`tensors` order)."""
        args, kwargs = list(args), dict(kwargs)
        for i, value in zip(self.positions, batch[: len(self.positions)]):
            args[i] = value
        for k, value in zip(self.names, batch[len(self.positions):]):
            kwargs[k] = value
        return tuple(args), kwargs


class ScaleObserved(Messenger):
    """Multiplies the log-density of the model's observed sites by ``scale``, leaving the latent sites (named
    in ``latent``, which a potential conditions on values and Pyro then also marks observed) alone.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     m = pyro.sample("m", dist.Normal(0.0, 1.0))
        ...     pyro.sample("obs", dist.Normal(m, 1.0), obs=torch.tensor(0.5))
        >>> trace = pyro.poutine.trace(ScaleObserved(4.0, {"m"})(model)).get_trace()
        >>> trace.nodes["m"]["scale"], trace.nodes["obs"]["scale"]
        (1.0, 4.0)
    """

    def __init__(self, scale: float, latent):
        super().__init__()
        self.scale = float(scale)
        self.latent = frozenset(latent)

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"] and msg["name"] not in self.latent:
            msg["scale"] = self.scale * msg["scale"]


def with_observed_scale(potential: ModelPotential, observed_scale: float) -> ModelPotential:
    """The potential of the same model with its observations' log-likelihood multiplied by ``observed_scale``
    (``n / b`` on a minibatch of ``b`` of ``n`` rows: an unbiased estimate of the full-data likelihood),
    the prior and Jacobian terms unscaled.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     m = pyro.sample("m", dist.Normal(torch.tensor(0.0), 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("obs", dist.Normal(m, 1.0), obs=y)
        >>> U = ModelPotential(model, (torch.zeros(4),))
        >>> z = torch.ones(1, 1)
        >>> with_observed_scale(U, 2.0)(z) - U(z)  # one more copy of 4 * N(0 | 1, 1) = 4 * (0.5 + 0.919)
        tensor([5.6758])
    """
    if observed_scale == 1:
        return potential
    scaled = copy.copy(potential)  # same sites and transforms: only the model run differs
    scaled.model = ScaleObserved(observed_scale, {site.name for site in potential.sites})(potential.model)
    return scaled


def eager_minibatch_potential_and_grad(potential: ModelPotential, split: DataSplit | None, observed_scale: float):
    """``(z: Tensor[C, D], batch: tuple[Tensor[b, ...]]) -> (U: Tensor[C], dU/dz: Tensor[C, D])`` by running
    the model, its observations scaled by ``observed_scale`` (``split=None``: the full data, ``batch``
    ignored)."""
    scaled = with_observed_scale(potential, observed_scale)
    if split is None:
        return lambda z, batch: scaled.potential_and_grad(z)

    def potential_and_grad(z, batch):
        return scaled.potential_and_grad(z, split.rebuild(potential.args, potential.kwargs, batch))

    return potential_and_grad


def compiled_minibatch_potential_and_grad(potential: ModelPotential, split: DataSplit | None, observed_scale: float,
                                          example: torch.Tensor, example_batch: tuple, probe_batch: tuple):
    """A captured ``(z, batch) -> (U, dU/dz)`` for ``z`` shaped like ``example: Tensor[C, D]`` and minibatches
    shaped like ``example_batch`` (a tuple of ``Tensor[b, ...]`` in ``split.tensors`` order; ``()`` with
    ``split=None`` for the full data, then baked into the graph).

    ``torch.func.grad_and_value`` of the scaled potential (distribution argument validation off) is
    captured by :func:`~bmm_ppl.inference.program.graph_capture.capture`: recorded once, simplified (what depends on
    neither ``z`` nor the batch is computed once) and run by TorchScript. Recording refuses Python control
    flow on tensor values, of the position or of the minibatch (the package's own input checks are skipped
    while capturing), and the capture must reproduce the eager potential and gradient at a second point
    and a second minibatch (``probe_batch``), or there is none. The global random state is left as it was.

    Returns:
        ``(potential_and_grad, "graph")``, or ``(None, "none")`` where the model cannot be captured.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     m = pyro.sample("m", dist.Normal(torch.tensor(0.0), 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("obs", dist.Normal(m, 1.0), obs=y)
        >>> y = torch.arange(4.0); U = ModelPotential(model, (y,)); split = DataSplit.of((y,), {}, 4)
        >>> fn, kind = compiled_minibatch_potential_and_grad(U, split, 2.0, torch.zeros(1, 1), (y[:2],), (y[2:],))
        >>> kind, fn(torch.zeros(1, 1), (y[2:],))[1]  # dU/dm = m - 2 * (2 + 3)
        ('graph', tensor([[-10.]]))
    """
    rng_devices = [] if example.device.type == "cpu" else [example.device]
    device_type = "cuda" if example.device.type == "cpu" else example.device.type
    with torch.random.fork_rng(devices=rng_devices, device_type=device_type):
        try:
            return _capture(potential, split, observed_scale, example, tuple(example_batch), tuple(probe_batch))
        except Exception:  # noqa: BLE001 - a model that cannot be captured runs eagerly
            return None, "none"


def _capture(potential, split, observed_scale, example, example_batch, probe_batch):
    eager = eager_minibatch_potential_and_grad(potential, split, observed_scale)
    scaled = with_observed_scale(potential, observed_scale)

    def total_and_values(z, *batch):
        data = None if split is None else split.rebuild(potential.args, potential.kwargs, batch)
        values = scaled(z, data)
        return values.sum(), values

    grad_and_value = torch.func.grad_and_value(total_and_values, has_aux=True)
    with pyro.validation_enabled(False):
        traced = capture(grad_and_value, (example.detach(),) + example_batch)

    def potential_and_grad(z, batch):
        grad, (_, value) = traced(z.detach(), *batch)
        return value, grad

    generator = torch.Generator(device=example.device).manual_seed(0)
    probe = example + torch.randn(example.shape, generator=generator, dtype=example.dtype, device=example.device) * 0.5
    reference_value, reference_grad = eager(probe, probe_batch)
    value, grad = potential_and_grad(probe, probe_batch)
    agrees = _agrees(value, reference_value) and _agrees(grad, reference_grad)
    return (potential_and_grad, "graph") if agrees else (None, "none")


def _agrees(value: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to rounding: ``|value - reference| <= rtol (|reference| + max |reference|)`` elementwise (a
    sum's rounding error scales with its largest terms, so small gradient entries get the large ones'
    absolute tolerance); non-finite entries must match exactly."""
    finite = torch.isfinite(reference)
    largest = float(reference[finite].abs().max()) if bool(finite.any()) else 0.0
    return bool(torch.allclose(value, reference, rtol=rtol, atol=rtol * largest + 1e-12, equal_nan=True))
