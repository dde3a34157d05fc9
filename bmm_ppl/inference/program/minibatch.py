"""A model's potential and gradient on a minibatch, with the minibatch as an input of one captured graph.

Stochastic-gradient samplers evaluate ``U_b(z) = -(n / b) log p(batch | z) - log p(z) - log |det dT/dz|`` at
a new minibatch every step. Re-running the Pyro model through its handlers for every step costs more
than the arithmetic; :func:`compiled_minibatch_potential_and_grad` records the forward and backward pass
once as a graph of tensor operations whose inputs are ``z`` AND the minibatch tensors, so one capture
serves every minibatch of the same size (the ``n / b`` scale is a constant of the graph).

:class:`DataArguments` says which of the model's arguments are data to subsample (tensors whose first
dimension is the data size) and rebuilds ``(args, kwargs)`` around a minibatch of them;
:class:`ScaleInPlate` scales the data plate's log-density by ``n / b`` and leaves the global prior alone.
Both serve every engine that takes minibatches (SVI, the SG-MCMC family).
"""

from __future__ import annotations

import copy

from pyro.poutine.messenger import Messenger
import pyro  # noqa: F401  (the examples below use it)
import torch

from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.program.graph_capture import capture_checked
from bmm_ppl.inference.program.potential import ModelPotential
from bmm_ppl.inference.program.sites import is_observed_site, prototype_trace


class DataArguments:
    """A model's arguments with its data tensors pulled out, so that they can be subsampled or fed to a
    captured graph, and the arguments rebuilt around a minibatch of them.

    Args:
        args: the model's positional arguments.
        kwargs: the model's keyword arguments.
        size: the data size ``n``: only tensors whose first dimension is ``n`` are data (a scalar or a
            parameter tensor of another length stays as it is); ``None``: every tensor argument.

    Examples:
        >>> data = DataArguments((torch.zeros(5, 2), 3, torch.ones(2)), {"y": torch.ones(5)}, size=5)
        >>> args, kwargs = data.rebuild(tuple(t[:2] for t in data.tensors))
        >>> args[0].shape, args[1], args[2].shape, kwargs["y"].shape
        (torch.Size([2, 2]), 3, torch.Size([2]), torch.Size([2]))
    """

    def __init__(self, args: tuple, kwargs: dict, size: int | None = None):
        self.args, self.kwargs, self.size = tuple(args), dict(kwargs), size

        def is_data(value):
            if not isinstance(value, torch.Tensor):
                return False
            return size is None or (value.dim() > 0 and value.shape[0] == size)

        self.positions = tuple(i for i, a in enumerate(self.args) if is_data(a))
        self.keys = tuple(sorted(k for k, v in self.kwargs.items() if is_data(v)))

    @property
    def tensors(self) -> tuple:
        """The data tensors, positional ones first: ``tuple[Tensor[n, ...]]``."""
        return tuple(self.args[i] for i in self.positions) + tuple(self.kwargs[k] for k in self.keys)

    def named(self) -> dict[str, torch.Tensor]:
        """``{"argument i" or keyword: tensor}`` for error messages."""
        names = [f"argument {i}" for i in self.positions] + list(self.keys)
        return dict(zip(names, self.tensors))

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the data tensors replaced by ``tensors`` (in :attr:`tensors` order)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for i, value in zip(self.positions, tensors[: len(self.positions)]):
            args[i] = value
        for k, value in zip(self.keys, tensors[len(self.positions):]):
            kwargs[k] = value
        return tuple(args), kwargs


class ScaleInPlate(Messenger):
    """Multiplies the log-density of every site inside plate ``name`` by ``factor``: ``n / b`` on a
    minibatch of ``b`` of ``n`` rows makes the plate's sum an unbiased estimate of the full-data sum.
    Sites outside the plate (the global latents' prior) are left alone.

    Examples:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     m = pyro.sample("m", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", 2):
        ...         pyro.sample("obs", dist.Normal(m, 1.0), obs=torch.zeros(2))
        >>> trace = pyro.poutine.trace(ScaleInPlate("data", 4.0)(model)).get_trace()
        >>> trace.nodes["m"]["scale"], trace.nodes["obs"]["scale"]
        (1.0, 4.0)
    """

    def __init__(self, name: str, factor: float):
        super().__init__()
        self.name, self.factor = name, factor

    def _pyro_sample(self, msg):
        if any(frame.name == self.name for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def data_plate(trace, num_data: int) -> str:
    """The name of the one vectorised plate of size ``num_data`` that holds the observations.

    Raises:
        UnsupportedModelError: none or several such plates (minibatch scaling would be ambiguous).
    """
    names = {
        frame.name
        for site in trace.nodes.values()
        if is_observed_site(site)
        for frame in site["cond_indep_stack"]
        if frame.size == num_data and frame.vectorized
    }
    if len(names) != 1:
        raise UnsupportedModelError(
            f"minibatches (batch_size) need the observations inside exactly one pyro.plate over the data's "
            f"{num_data} rows, to scale them by n / batch_size; found {sorted(names) or 'none'}"
        )
    return names.pop()


def with_data_scale(potential: ModelPotential, num_data: int, factor: float) -> ModelPotential:
    """The potential of the same model with the sites of its data plate scaled by ``factor`` (``n / b`` on a
    minibatch of ``b`` of ``n`` rows: an unbiased estimate of the full-data likelihood); the prior of the
    global latents and the Jacobian terms unscaled.

    Raises:
        UnsupportedModelError: no single data plate, or a latent site inside it (a local latent cannot be
            subsampled by a sampler over a fixed parameter vector).

    Examples:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     m = pyro.sample("m", dist.Normal(torch.tensor(0.0), 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("obs", dist.Normal(m, 1.0), obs=y)
        >>> U = ModelPotential(model, (torch.zeros(4),))
        >>> z = torch.ones(1, 1)
        >>> with_data_scale(U, 4, 2.0)(z) - U(z)  # one more copy of 4 * N(0 | 1, 1) = 4 * (0.5 + 0.919)
        tensor([5.6758])
    """
    if factor == 1:
        return potential
    trace = prototype_trace(potential.model, potential.args, potential.kwargs)
    plate = data_plate(trace, num_data)
    local = [s.name for s in potential.sites if any(f.name == plate for f in trace.nodes[s.name]["cond_indep_stack"])]
    if local:
        raise UnsupportedModelError(
            f"site(s) {local} are latent inside the data plate {plate!r}: minibatches need global latents only"
        )
    scaled = copy.copy(potential)  # same sites and transforms: only the model run differs
    scaled.model = ScaleInPlate(plate, factor)(potential.model)
    return scaled


def eager_minibatch_potential_and_grad(potential: ModelPotential, split: DataArguments | None, observed_scale: float):
    """``(z: Tensor[C, D], batch: tuple[Tensor[b, ...]]) -> (U: Tensor[C], dU/dz: Tensor[C, D])`` by running
    the model, its data plate scaled by ``observed_scale`` (``split=None``: the full data, ``batch``
    ignored)."""
    if split is None:
        return lambda z, batch: potential.potential_and_grad(z)
    scaled = with_data_scale(potential, split.size, observed_scale)

    def potential_and_grad(z, batch):
        return scaled.potential_and_grad(z, split.rebuild(batch))

    return potential_and_grad


def compiled_minibatch_potential_and_grad(potential: ModelPotential, split: DataArguments | None, observed_scale: float,
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

    Examples:
        >>> import pyro.distributions as dist
        >>> def model(y):
        ...     m = pyro.sample("m", dist.Normal(torch.tensor(0.0), 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("obs", dist.Normal(m, 1.0), obs=y)
        >>> y = torch.arange(4.0); U = ModelPotential(model, (y,)); split = DataArguments((y,), {}, size=4)
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
    scaled = potential if split is None else with_data_scale(potential, split.size, observed_scale)

    def total_and_values(z, *batch):
        data = None if split is None else split.rebuild(batch)
        values = scaled(z, data)
        return values.sum(), values

    grad_and_value = torch.func.grad_and_value(total_and_values, has_aux=True)

    def value_and_grad(z, *batch):
        grad, (_, value) = grad_and_value(z, *batch)
        return value, grad

    generator = torch.Generator(device=example.device).manual_seed(0)
    probe = example + torch.randn(example.shape, generator=generator, dtype=example.dtype, device=example.device) * 0.5
    traced = capture_checked(value_and_grad, (example.detach(),) + example_batch, (probe,) + probe_batch,
                             lambda z, *batch: eager(z, batch))
    if traced is None:
        return None, "none"

    def potential_and_grad(z, batch):
        return traced(z.detach(), *batch)

    return potential_and_grad, "graph"
