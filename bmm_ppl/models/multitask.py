"""Multi-task Bayesian linear regression whose task structure is a prior over the weight matrix.

Data are ``(x, task, y)``: inputs ``x: Tensor[n, d_in]`` (or ``[n]``), integer task labels
``task: Tensor[n]`` in ``[0, num_tasks)``, targets ``y: Tensor[n]``. Task ``k`` has weights ``W[k]``
(Tensor[d] over the features ``phi(x)``) and its own noise variance; the *structure* is the prior over
``W`` (Tensor[num_tasks, d]):

- :class:`IndependentTasks`: ``W[k] ~ N(0, alpha^-1 I)`` independently;
- :class:`SharedTask`: one weight vector for all tasks (the pooled model);
- :class:`HierarchicalTasks`: ``W[k] ~ N(mu, Sigma)`` with shared ``mu`` and ``Sigma``;
- :class:`RelatedTasks`: matrix-normal ``W ~ MN(0, Omega, diag(alpha)^-1)``: a task covariance
  ``Omega`` (which tasks are related) and ARD precisions ``alpha`` over features (sparsity), as in
  sparse Bayesian multi-task learning.

Every structure is linear-Gaussian, so :class:`~bmm_ppl.inference.Exact` integrates ``W`` exactly and
learns the structure's hyperparameters by type-II; as Pyro programs the same models run under SVI and
the samplers. Each hyperparameter is fixed (a tensor or number), learned (``None``: a ``pyro.param``) or,
for the sampling engines, given a hyperprior (a distribution).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from bmm_ppl.models.features import IdentityFeatures, PolynomialFeatures, RBFFeatures
from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior, Learned, as_hyperparameter
from bmm_ppl.contracts.regression_forms import GaussianPriorRegressionForm
from bmm_ppl.validation import as_real_valued, check_same_device, check_same_float_dtype, check_same_length, check_tensor


@dataclasses.dataclass(frozen=True)
class HyperparameterSlot:
    """One hyperparameter of a structure: its spec, constraint and the shape of its value."""

    name: str
    spec: object
    constraint: constraints.Constraint
    shape: tuple
    default_init: Callable[[torch.Tensor], torch.Tensor]


def _slot_value(slot: HyperparameterSlot, like: torch.Tensor) -> torch.Tensor:
    spec = slot.spec
    if isinstance(spec, Fixed):
        return torch.as_tensor(spec.value, dtype=like.dtype, device=like.device).expand(slot.shape)
    if isinstance(spec, Learned):
        return pyro.param(slot.name, lambda: initial_value(slot, like), constraint=slot.constraint)
    return pyro.sample(slot.name, spec.prior)


def initial_value(slot: HyperparameterSlot, like: torch.Tensor) -> torch.Tensor:
    """The starting value of a learned hyperparameter, on the device and dtype of ``like``."""
    init = slot.spec.init
    if isinstance(init, torch.Tensor):
        return init.to(dtype=like.dtype, device=like.device)
    if init == 1.0:
        return slot.default_init(like)
    return torch.full(slot.shape, float(init), dtype=like.dtype, device=like.device)


def _real_design(features, x, y):
    """``features(x)`` in a floating dtype: integer inputs would drag the design and every fixed
    hyperparameter into integers. Integer targets are refused (regression targets are real numbers)."""
    if y is not None and not y.is_floating_point():
        raise ValueError(f"y must be real-valued targets in a floating dtype, got {y.dtype}; pass y.to(torch.float64)")
    dtype = check_same_float_dtype(x=x, y=y) or torch.get_default_dtype()
    if isinstance(features, (IdentityFeatures, PolynomialFeatures, RBFFeatures)):
        x = as_real_valued("x", x, dtype)
    return as_real_valued("features(x)", features(x), dtype)


def _eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


class TaskStructure:
    """A prior over the task weight matrix. Subclasses define the slots, the design map and the prior."""

    def slots(self, num_tasks: int, num_features: int) -> list[HyperparameterSlot]:
        raise NotImplementedError

    def num_weights(self, num_tasks: int, num_features: int) -> int:
        return num_tasks * num_features

    def design(self, features: torch.Tensor, task: torch.Tensor, num_tasks: int) -> torch.Tensor:
        """Tensor[n, P]: row i holds ``phi(x_i)`` in the block of task ``task_i``."""
        n, d = features.shape
        rows = features.new_zeros(n, num_tasks, d)
        rows[torch.arange(n, device=features.device), task] = features
        return rows.reshape(n, num_tasks * d)

    def prior(self, values: dict, num_tasks: int, num_features: int, like: torch.Tensor):
        """``(mean: Tensor[P], covariance: Tensor[P, P])`` of the flattened weights."""
        raise NotImplementedError

    def task_weights(self, flat: torch.Tensor, num_tasks: int, num_features: int) -> torch.Tensor:
        """Tensor[..., num_tasks, d] from flattened weights Tensor[..., P]."""
        return flat.reshape(flat.shape[:-1] + (num_tasks, num_features))


class IndependentTasks(TaskStructure):
    """``W[k] ~ N(0, alpha^-1 I)`` independently for each task; ``alpha`` shared."""

    def __init__(self, prior_precision=None):
        self.prior_precision = as_hyperparameter("prior_precision", prior_precision)

    def slots(self, num_tasks, num_features):
        return [HyperparameterSlot("prior_precision", self.prior_precision, constraints.positive, (), lambda like: like.new_ones(()))]

    def prior(self, values, num_tasks, num_features, like):
        size = num_tasks * num_features
        return like.new_zeros(size), _eye(size, like) / values["prior_precision"]


class SharedTask(IndependentTasks):
    """One weight vector ``w ~ N(0, alpha^-1 I)`` for every task: the pooled model."""

    def num_weights(self, num_tasks, num_features):
        return num_features

    def design(self, features, task, num_tasks):
        return features

    def prior(self, values, num_tasks, num_features, like):
        return like.new_zeros(num_features), _eye(num_features, like) / values["prior_precision"]

    def task_weights(self, flat, num_tasks, num_features):
        return flat.unsqueeze(-2).expand(flat.shape[:-1] + (num_tasks, num_features))


class HierarchicalTasks(TaskStructure):
    """``W[k] ~ N(mu, Sigma)`` with a shared mean ``mu`` (Tensor[d]) and covariance ``Sigma`` (Tensor[d, d])."""

    def __init__(self, mean=None, covariance=None):
        self.mean = as_hyperparameter("mean", mean, positive=False)
        self.covariance = as_hyperparameter("covariance", covariance, positive=False)

    def slots(self, num_tasks, num_features):
        return [
            HyperparameterSlot("mean", self.mean, constraints.real, (num_features,), lambda like: like.new_zeros(num_features)),
            HyperparameterSlot(
                "covariance", self.covariance, constraints.positive_definite, (num_features, num_features),
                lambda like: _eye(num_features, like),
            ),
        ]

    def prior(self, values, num_tasks, num_features, like):
        mean = values["mean"].expand(num_tasks, num_features).reshape(-1)
        covariance = torch.kron(_eye(num_tasks, like), values["covariance"])
        return mean, covariance


class RelatedTasks(TaskStructure):
    """Matrix-normal ``W ~ MN(0, Omega, diag(alpha)^-1)``: ``cov(vec W) = Omega (x) diag(1 / alpha)``.

    ``task_covariance`` (Omega, Tensor[K, K]) says which tasks are related; ``feature_precision``
    (alpha, Tensor[d]) switches features off (ARD). Omega and alpha share one overall scale that the
    evidence cannot separate; read the relations from ``task_correlation(Omega)``.
    """

    def __init__(self, task_covariance=None, feature_precision=None):
        self.task_covariance = as_hyperparameter("task_covariance", task_covariance, positive=False)
        self.feature_precision = as_hyperparameter("feature_precision", feature_precision)

    def slots(self, num_tasks, num_features):
        return [
            HyperparameterSlot(
                "task_covariance", self.task_covariance, constraints.positive_definite, (num_tasks, num_tasks),
                lambda like: _eye(num_tasks, like),
            ),
            HyperparameterSlot(
                "feature_precision", self.feature_precision, constraints.positive, (num_features,),
                lambda like: like.new_ones(num_features),
            ),
        ]

    def prior(self, values, num_tasks, num_features, like):
        covariance = torch.kron(values["task_covariance"], torch.diag(1.0 / values["feature_precision"]))
        return like.new_zeros(num_tasks * num_features), covariance


def task_correlation(task_covariance: torch.Tensor) -> torch.Tensor:
    """The correlation matrix of a task covariance."""
    scale = task_covariance.diagonal(dim1=-2, dim2=-1).rsqrt()
    return task_covariance * scale.unsqueeze(-1) * scale.unsqueeze(-2)


class MultiTaskRegression:
    """Multi-task Bayesian linear regression as a Pyro program ``model(x, task, y=None)``.

    Args:
        structure: a :class:`TaskStructure` (the prior over the task weights).
        num_tasks: K.
        features: feature map ``x -> Tensor[n, d]`` (default: the inputs with a constant). An
            ``nn.Module`` makes the deep variant: a shared trunk whose weights SVI learns jointly with the
            Bayesian task heads (tied by ``structure``) and the per-task noise variances (homoscedastic
            task weighting: a noisier task weighs less).
        noise_variance: per-task noise variances (Tensor[K]); ``None`` learns them (type-II), a number
            fixes them all.
        noncentred: sample standardised weights ``"W_std"`` and form ``"W"`` deterministically
            (better geometry for samplers); exact engines integrate either form.

    Sites: ``"W"`` (Tensor[P], the flattened weights; ``structure.task_weights`` reshapes), ``"obs"``.

    Examples:
        >>> model = MultiTaskRegression(RelatedTasks(), num_tasks=3)
        >>> x = torch.randn(12, 2); task = torch.arange(12) % 3
        >>> trace = pyro.poutine.trace(model).get_trace(x, task)
        >>> trace.nodes["W"]["value"].shape
        torch.Size([9])
    """

    def __init__(self, structure: TaskStructure, num_tasks: int, features: Callable | None = None,
                 noise_variance=None, noncentred: bool = False):
        if int(num_tasks) != num_tasks or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks}")
        self.structure = structure
        self.num_tasks = int(num_tasks)
        self.features = features if features is not None else IdentityFeatures()
        self.noise_variance = as_hyperparameter("noise_variance", noise_variance)
        self.noncentred = noncentred

    def _checked(self, x, task, y, require_every_task: bool = False):
        check_tensor("x", x, dim=(1, 2))
        check_tensor("task", task, dim=1, finite=False)
        if task.is_floating_point() or task.dtype == torch.bool:
            raise TypeError(f"task must hold integer task labels, got dtype {task.dtype}")
        check_same_length(x=x, task=task, y=y)
        check_same_device(x=x, task=task, y=y)
        if y is not None:
            check_tensor("y", y, dim=1)
        if task.device.type != "meta" and task.numel() and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
            raise ValueError(f"task labels must lie in [0, {self.num_tasks}), got range [{int(task.min())}, {int(task.max())}]")
        if require_every_task and task.device.type != "meta" and task.numel():
            # The exact path fits all tasks at once and needs data for each; a minibatch under SVI or a
            # prediction may well cover a subset of the tasks.
            missing = sorted(set(range(self.num_tasks)) - set(task.unique().tolist()))
            if missing:
                raise ValueError(f"tasks {missing} have no data; every one of the {self.num_tasks} tasks needs examples")
        return _real_design(self.features, x, y)

    def slots(self, num_features: int) -> list[HyperparameterSlot]:
        noise = HyperparameterSlot(
            "noise_variance", self.noise_variance, constraints.positive, (self.num_tasks,),
            lambda like: like.new_ones(self.num_tasks),
        )
        return self.structure.slots(self.num_tasks, num_features) + [noise]

    def __call__(self, x, task, y=None):
        if isinstance(self.features, torch.nn.Module):
            # A neural trunk: its weights are learned jointly (type-II) by SVI.
            pyro.module("features", self.features)
        phi = self._checked(x, task, y)
        d = phi.shape[-1]
        values = {slot.name: _slot_value(slot, phi) for slot in self.slots(d)}
        mean, covariance = self.structure.prior(values, self.num_tasks, d, phi)
        if self.noncentred:
            scale_tril = torch.linalg.cholesky(covariance)
            standard = pyro.sample("W_std", dist.Normal(torch.zeros_like(mean), 1.0).to_event(1))
            weights = pyro.deterministic("W", mean + (scale_tril @ standard.unsqueeze(-1)).squeeze(-1), event_dim=1)
        else:
            weights = pyro.sample("W", dist.MultivariateNormal(mean, covariance_matrix=covariance))
        # weights: Tensor[P], or Tensor[S, 1, P] under a plate of posterior draws left of "data".
        per_task = self.structure.task_weights(weights.reshape(weights.shape[:-2] + weights.shape[-1:]) if weights.dim() > 2 else weights,
                                               self.num_tasks, d)
        mean_y = (phi * per_task[..., task, :]).sum(-1)
        noise = values["noise_variance"].expand(self.num_tasks)[task]
        with pyro.plate("data", phi.shape[0], dim=-1, device=x.device):
            return pyro.sample("obs", dist.Normal(mean_y, noise.sqrt()), obs=y)

    # --------------------------------------------------------------- exact path
    def learnable_hyperparameters(self, x, task, y=None) -> dict:
        """``{name: (initial value, constraint)}`` of the hyperparameters learned by type-II."""
        phi = _real_design(self.features, x, y)
        out = {}
        for slot in self.slots(phi.shape[-1]):
            if isinstance(slot.spec, Hyperprior):
                raise TypeError(f"{slot.name} has a hyperprior")
            if isinstance(slot.spec, Learned):
                out[slot.name] = (initial_value(slot, phi), slot.constraint)
        return out

    def gaussian_form(self, x, task, y, hyperparameters: dict) -> GaussianPriorRegressionForm:
        """The linear-Gaussian structure at the given values of the learned hyperparameters."""
        if y is None:
            raise ValueError("y is required: the evidence is of observed data")
        phi = self._checked(x, task, y, require_every_task=True)
        d = phi.shape[-1]
        values = {}
        for slot in self.slots(d):
            if isinstance(slot.spec, Fixed):
                values[slot.name] = torch.as_tensor(slot.spec.value, dtype=phi.dtype, device=phi.device).expand(slot.shape)
            elif isinstance(slot.spec, Learned):
                values[slot.name] = hyperparameters[slot.name]
            else:
                raise TypeError(f"{slot.name} has a hyperprior")
        mean, covariance = self.structure.prior(values, self.num_tasks, d, phi)
        design = self.structure.design(phi, task, self.num_tasks)
        noise = values["noise_variance"].expand(self.num_tasks)[task]
        site = "W_std" if self.noncentred else "W"
        if self.noncentred:
            # theta = W_std with W = mean + L W_std: the design absorbs L and the targets the mean.
            scale_tril = torch.linalg.cholesky(covariance)
            return GaussianPriorRegressionForm(design @ scale_tril, y - design @ mean, torch.zeros_like(mean),
                                      _eye(mean.shape[0], mean), noise, site)
        return GaussianPriorRegressionForm(design, y, mean, covariance, noise, site)

    def __repr__(self) -> str:
        return f"MultiTaskRegression({type(self.structure).__name__}, num_tasks={self.num_tasks})"
