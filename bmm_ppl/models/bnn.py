"""Bayesian neural networks: any ``torch.nn.Module`` as a Pyro program with priors on its weights."""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.func import functional_call, vmap

from bmm_ppl._enums import StrEnum
from bmm_ppl.contracts.hyperparameters import as_hyperparameter, hyperparameter_site
from bmm_ppl.capture_state import is_capturing
from bmm_ppl.validation import (
    as_real_valued,
    check_nonempty,
    check_same_device,
    check_same_float_dtype,
    check_same_length,
    check_tensor,
)


class WeightPrior(StrEnum):
    """The family of the weight prior; every family is centred at zero with the layer's scale."""

    NORMAL = "normal"
    STUDENT_T = "student-t"  # heavy tailed: a Gaussian scale mixture with inverse-gamma variances
    LAPLACE = "laplace"


class Likelihood(StrEnum):
    """The observation model of :class:`BayesianNeuralNetwork` (``likelihood=``; the strings are accepted too).

    Attributes:
        GAUSSIAN: ``y ~ Normal(f(x), noise)``, for regression.
        CATEGORICAL: ``y ~ Categorical(logits=f(x))``, for classification.
    """

    GAUSSIAN = "gaussian"  # y ~ N(f(x), noise^2); f(x) is Tensor[n] or Tensor[n, 1] (or [n, k]: k outputs)
    CATEGORICAL = "categorical"  # y ~ Categorical(logits=f(x)); f(x) is Tensor[n, classes]


def _layer_of(parameter_name: str) -> str:
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


class BayesianNeuralNetwork:
    """A neural network with priors on its weights, as a Pyro program ``model(x, y=None)``.

    Every parameter tensor of ``module`` becomes a sample site ``"<name>.<parameter>"`` (e.g.
    ``"net.0.weight"``) with a zero-centred prior whose scale is shared within a layer (the parameters
    of one submodule). The per-layer scale and the Gaussian noise each take a number (fixed), ``None``
    (learned by type-II: a ``pyro.param`` site ``"<name>.prior_scale.<layer>"`` / ``"noise"``) or a
    distribution (a hyperprior: a ``pyro.sample`` site). The network runs with the sampled weights via
    ``torch.func.functional_call`` (vectorised with ``vmap`` over leading draw dimensions), so the same
    program runs under SVI, NUTS or SGLD; ``module``'s own parameter values are never used.

    **Prior collapse.** Learning ``prior_scale`` by maximising the ELBO under a mean-field guide
    (``SVI(guide="normal")``) can collapse the weight posterior onto a shrinking prior on small data:
    the network explains nothing and the noise absorbs all the variance (Blundell et al. 2015). The
    mean-field gap (KL from the true posterior) widens as a larger scale lets the weights correlate, so
    the ELBO prefers small scales. Remedy: a guide that models the correlations, ``guide="mvn"`` for
    small nets (``"lowrank"`` helps partly). ``tests/models/test_bnn.py`` shows the failure and the fix.

    ``temperature`` T != 1 tempers the whole joint density to ``p(y, w)^(1/T)`` (T < 1: a "cold"
    posterior). Its ELBO is then not a bound on the evidence of the untempered model.

    Args:
        module: the network, ``module(x) -> Tensor[n, out]`` (or ``Tensor[n]``).
        prior_scale: per-layer prior scale (standard deviation for ``"normal"``).
        prior: ``"normal"``, ``"student-t"`` (with ``df``) or ``"laplace"``.
        likelihood: ``"gaussian"`` or ``"categorical"``.
        noise: the Gaussian observation noise standard deviation (ignored for categorical).
        temperature: posterior temperature T > 0.
        df: degrees of freedom of the Student-t prior.
        name: prefix of the weight and scale sites.

    Sites: ``"<name>.<parameter>"`` per weight tensor; ``"<name>.prior_scale.<layer>"`` and ``"noise"`` where
    learned or given hyperpriors; ``"obs"`` in the plate ``"data"``.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> model = BayesianNeuralNetwork(net, prior_scale=None, noise=0.1)
        >>> trace = pyro.poutine.trace(model).get_trace(torch.randn(5, 1))
        >>> trace.nodes["net.0.weight"]["value"].shape, trace.nodes["obs"]["value"].shape
        (torch.Size([8, 1]), torch.Size([5]))
    """

    def __init__(
        self,
        module: torch.nn.Module,
        prior_scale=None,
        prior: str | WeightPrior = WeightPrior.NORMAL,
        likelihood: str | Likelihood = Likelihood.GAUSSIAN,
        noise=None,
        temperature: float = 1.0,
        df: float = 3.0,
        name: str = "net",
    ):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.prior = WeightPrior.parse(prior, "prior")
        self.likelihood = Likelihood.parse(likelihood, "likelihood")
        self.prior_scale = as_hyperparameter("prior_scale", prior_scale)
        self.noise = as_hyperparameter("noise", noise)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not df > 0:
            raise ValueError(f"df must be positive, got {df!r}")
        self.temperature = float(temperature)
        self.df = float(df)
        self.name = name
        self.layers: dict[str, list[str]] = {}
        for parameter_name, _ in module.named_parameters():
            self.layers.setdefault(_layer_of(parameter_name), []).append(parameter_name)
        if not self.layers:
            raise ValueError("module has no parameters to put priors on")
        self._shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}

    # --------------------------------------------------------------- priors
    def _weight_prior(self, scale: torch.Tensor, shape: tuple) -> dist.Distribution:
        scale = scale.reshape(scale.shape + (1,) * len(shape)).expand(scale.shape + shape)
        loc = torch.zeros_like(scale)
        if self.prior is WeightPrior.NORMAL:
            base = dist.Normal(loc, scale)
        elif self.prior is WeightPrior.LAPLACE:
            base = dist.Laplace(loc, scale)
        else:
            base = dist.StudentT(torch.full_like(scale, self.df), loc, scale)
        return base.to_event(len(shape))

    def sample_weights(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Samples the prior scales (where they are sites) and the weights: ``{parameter name: Tensor}``."""
        weights = {}
        for layer, names in self.layers.items():
            scale = hyperparameter_site(f"{self.name}.prior_scale.{layer}", self.prior_scale, like=like)
            for parameter_name in names:
                prior = self._weight_prior(scale, self._shapes[parameter_name])
                weights[parameter_name] = pyro.sample(f"{self.name}.{parameter_name}", prior)
        return weights

    # -------------------------------------------------------------- network
    def network(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` with the given weights, keyed by parameter or by site name (e.g. ``post.samples(S)``;
        other entries are ignored).

        Args:
            weights: ``{name: Tensor[*draws, *parameter_shape]}``.
            x: Tensor[n, ...].

        Returns:
            Tensor[*draws, n, *out].
        """
        prefix = f"{self.name}."
        named = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
        weights = {}
        for n, shape in self._shapes.items():
            w = named[n]
            weights[n] = w.unsqueeze(w.dim() - len(shape)) if w.dim() > len(shape) else w
        return self._network(weights, x)[0]

    def _network(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch_shapes = [w.shape[: w.dim() - len(self._shapes[n])] for n, w in weights.items()]
        batch = torch.broadcast_shapes(*batch_shapes)
        if len(batch) == 0:
            return functional_call(self.module, weights, (x,)), 0
        if batch[-1] != 1:
            raise ValueError(f"weights batched as {tuple(batch)} do not leave the data plate (dim -1) free")
        flat = {n: w.expand(batch + self._shapes[n]).reshape((-1,) + self._shapes[n]) for n, w in weights.items()}
        out = vmap(lambda w: functional_call(self.module, w, (x,)))(flat)
        return out.reshape(batch[:-1] + out.shape[1:]), len(batch) - 1

    # ---------------------------------------------------------------- model
    def _checked(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checks the data; returns the tensor whose dtype the hyperparameters take, and ``y`` (Gaussian
        targets as floating point)."""
        check_tensor("x", x)
        if x.dim() == 0:
            raise ValueError("x must have a data dimension first, got a scalar")
        # The weights are sample sites whose dtype follows the prior scales, which follow ``like``: the
        # floating data, or (integer x, e.g. indices into an Embedding) the module's own dtype.
        parameter_dtype = next(self.module.parameters()).dtype
        like = x if x.is_floating_point() else torch.zeros((), dtype=parameter_dtype, device=x.device)
        if y is not None:
            check_tensor("y", y)
            check_same_length(x=x, y=y)
            check_same_device(x=x, y=y)
            check_nonempty("x", x)
            if self.likelihood is Likelihood.CATEGORICAL:
                if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
                    raise ValueError(
                        f"a categorical likelihood needs integer class labels y: Tensor[n], got {y.dtype} {tuple(y.shape)}"
                    )
            else:
                check_same_float_dtype(x=x, y=y)
                # Gaussian targets are real numbers: integer y would be observed as integers.
                y = as_real_valued("y", y, like.dtype)
        return like, y

    def _checked_labels(self, y: torch.Tensor, logits: torch.Tensor) -> None:
        # Data-dependent, so skipped while a potential is traced for jit (the data were checked at the first run).
        if torch.jit.is_tracing() or is_capturing() or y.device.type == "meta":
            return
        num_classes = logits.shape[-1]
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"y holds class labels in [{low}, {high}] but the network gives {num_classes} classes: "
                f"labels must lie in [0, {num_classes})"
            )

    def _run_network(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if x.is_floating_point():
            return self._network(weights, x)
        try:
            return self._network(weights, x)
        except RuntimeError as error:
            # Integer x is legitimate for a network that takes indices (an Embedding); for any other it
            # ends in a dtype error deep inside torch, which names neither x nor the remedy.
            raise ValueError(
                f"x is an integer tensor ({x.dtype}) and the network cannot take it ({error}); pass real-valued "
                f"inputs as floating point, e.g. x.to({next(self.module.parameters()).dtype})"
            ) from error

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        like, y = self._checked(x, y)
        tempered = poutine.scale(scale=1.0 / self.temperature) if self.temperature != 1.0 else contextlib.nullcontext()
        with tempered:
            weights = self.sample_weights(like)
            out, num_draw_dims = self._run_network(weights, x)
            num_data = x.shape[0]
            if self.likelihood is Likelihood.CATEGORICAL:
                if y is not None:
                    self._checked_labels(y, out)
                with pyro.plate("data", num_data, dim=-1, device=x.device):
                    # Recorded so that predictive class probabilities (and distillation) need no
                    # Monte-Carlo average of one-hot label draws.
                    logits = pyro.deterministic("logits", out, event_dim=1)
                    return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
            noise = hyperparameter_site("noise", self.noise, like=like)
            per_datum = tuple(out.shape[num_draw_dims + 1 :])  # one datum's outputs
            if tuple(per_datum) == (1,) and (y is None or y.dim() == 1):
                out, per_datum = out.squeeze(-1), ()
            if per_datum:
                noise = noise.reshape(noise.shape + (1,) * len(per_datum)) if noise.dim() else noise
            with pyro.plate("data", num_data, dim=-1, device=x.device):
                # The output the likelihood reads (a Laplace GGN differentiates the network up to it).
                mean = pyro.deterministic("mean", out, event_dim=len(per_datum))
                return pyro.sample("obs", dist.Normal(mean, noise).to_event(len(per_datum)), obs=y)

    def __repr__(self) -> str:
        return (
            f"BayesianNeuralNetwork({type(self.module).__name__}, prior={self.prior.value}, "
            f"prior_scale={self.prior_scale}, likelihood={self.likelihood.value}, noise={self.noise}, "
            f"temperature={self.temperature})"
        )

    @property
    def num_weights(self) -> int:
        return sum(math.prod(s) for s in self._shapes.values())
