"""Teachers: what a student is distilled from — a module, an ensemble of modules, or a ``Posterior``.

Every teacher answers :meth:`Teacher.predict` with a :class:`TeacherPrediction`: class probabilities
(and logits where it has a single set) for classification, a predictive mean and variance for
regression. Output conventions for modules:

* classification: ``module(x) -> Tensor[n, K]`` logits;
* regression: ``module(x) -> Tensor[n]`` or ``Tensor[n, 1]`` (a mean; variance zero) or ``Tensor[n, 2]``
  (mean and log-variance, the same layout a regression student uses).

A :class:`~bmm_ppl.inference.Posterior` teacher is its posterior predictive mixture, from
``posterior.predict(x, num_samples=S)``:

* classification: the mean of ``softmax`` over draws of a ``pyro.deterministic`` site ``"logits"``, or
  the mean of a ``"probs"`` site, when the model records one; otherwise the mean of one-hot encodings
  of the observation site's draws (``"obs"`` unless ``site=`` says otherwise) — an unbiased but noisier
  estimate (Monte-Carlo error ~ 1/√S per class probability). Recording ``pyro.deterministic("logits",
  f)`` in a classifier makes distillation from it both exact per draw and cheaper.
* regression: the mixture moments of ``"mean"`` and ``"variance"`` deterministic sites when both are
  recorded; otherwise the sample mean and variance of the observation draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bmm_ppl._enums import StrEnum
from bmm_ppl.distillation.losses import mixture_moments


class Task(StrEnum):
    """What the teacher predicts."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass
class TeacherPrediction:
    """A teacher's predictive distribution at a batch of inputs.

    Attributes:
        probs: Tensor[n, K] class probabilities (classification).
        logits: Tensor[n, K] logits where the teacher has a single set (one module), else ``None``.
        mean: Tensor[n] predictive mean (regression).
        variance: Tensor[n] predictive variance (regression).
    """

    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    variance: torch.Tensor | None = None

    def select(self, index) -> "TeacherPrediction":
        """The prediction at rows ``index``."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return TeacherPrediction(pick(self.probs), pick(self.logits), pick(self.mean), pick(self.variance))

    @staticmethod
    def concatenate(parts: list["TeacherPrediction"]) -> "TeacherPrediction":
        join = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return TeacherPrediction(join("probs"), join("logits"), join("mean"), join("variance"))


def regression_output(output: torch.Tensor, argument: str = "output") -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, variance)`` Tensor[n] each from a regression module's ``Tensor[n]``, ``[n, 1]`` or ``[n, 2]``."""
    if output.dim() == 1:
        return output, torch.zeros_like(output)
    if output.dim() == 2 and output.shape[1] == 1:
        return output[:, 0], torch.zeros_like(output[:, 0])
    if output.dim() == 2 and output.shape[1] == 2:
        return output[:, 0], torch.exp(output[:, 1])
    raise ValueError(f"a regression {argument} must be Tensor[n], [n, 1] or [n, 2] (mean, log-variance), got {tuple(output.shape)}")


class Teacher:
    """Base class: ``predict(x) -> TeacherPrediction`` without gradients."""

    task: Task
    num_classes: int | None = None

    def predict(self, x: torch.Tensor) -> TeacherPrediction:
        raise NotImplementedError

    def device(self) -> torch.device | None:
        """The device of the teacher's parameters, where it has any."""
        return None


def _module_device(module: torch.nn.Module) -> torch.device | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


class ModuleTeacher(Teacher):
    """One network; its logits (classification) or mean/log-variance (regression)."""

    def __init__(self, module: torch.nn.Module, task: str | Task = Task.CLASSIFICATION):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.task = Task.parse(task, "task")

    def device(self):
        return _module_device(self.module)

    @torch.no_grad()
    def predict(self, x):
        out = self.module(x)
        if self.task is Task.CLASSIFICATION:
            if out.dim() != 2:
                raise ValueError(f"a classification teacher must return logits Tensor[n, K], got {tuple(out.shape)}")
            return TeacherPrediction(probs=torch.softmax(out, -1), logits=out)
        mean, variance = regression_output(out, "teacher output")
        return TeacherPrediction(mean=mean, variance=variance)


class EnsembleTeacher(Teacher):
    """An equally weighted ensemble: the mean of the members' softmaxes, or their Gaussian mixture."""

    def __init__(self, modules, task: str | Task = Task.CLASSIFICATION):
        modules = list(modules)
        if not modules:
            raise ValueError("an ensemble teacher needs at least one module")
        self.members = [ModuleTeacher(m, task) for m in modules]
        self.task = Task.parse(task, "task")

    def device(self):
        return self.members[0].device()

    @torch.no_grad()
    def predict(self, x):
        parts = [m.predict(x) for m in self.members]
        if self.task is Task.CLASSIFICATION:
            return TeacherPrediction(probs=torch.stack([p.probs for p in parts]).mean(0))
        mean, variance = mixture_moments(torch.stack([p.mean for p in parts]), torch.stack([p.variance for p in parts]))
        return TeacherPrediction(mean=mean, variance=variance)


class PosteriorTeacher(Teacher):
    """A :class:`~bmm_ppl.inference.Posterior`'s predictive mixture over ``num_samples`` draws (see module doc).

    Args:
        posterior: a fitted posterior whose model is called as ``model(x)`` for predictions.
        num_samples: S, the number of posterior draws per prediction (at most the stored draws).
        task: ``"classification"`` or ``"regression"``; ``None`` guesses from the model (a ``"logits"`` or
            ``"probs"`` site, or integer observations, mean classification).
        num_classes: K for the one-hot fallback; ``None`` takes it from the student (in :func:`distill`).
        site: the observation site's name.
    """

    def __init__(self, posterior, num_samples: int = 100, task=None, num_classes: int | None = None, site: str = "obs"):
        self.posterior = posterior
        self.num_samples = int(num_samples)
        self.task = None if task is None else Task.parse(task, "task")
        self.num_classes = num_classes
        self.site = site

    def device(self):
        return self.posterior.device

    @torch.no_grad()
    def predict(self, x):
        num_samples = self.num_samples
        if self.posterior.has_stored_draws:
            # Never more than the stored draws (all of them when fewer than asked).
            num_samples = min(num_samples, next(iter(self.posterior.samples().values())).shape[0])
        draws = self.posterior.predict(x, num_samples=num_samples)
        task = self.task
        if task is None:
            observed = draws.get(self.site)
            integer = observed is not None and not observed.is_floating_point()
            task = Task.CLASSIFICATION if ("logits" in draws or "probs" in draws or integer) else Task.REGRESSION
            self.task = task
        if task is Task.CLASSIFICATION:
            if "logits" in draws:
                return TeacherPrediction(probs=torch.softmax(draws["logits"], -1).mean(0))
            if "probs" in draws:
                return TeacherPrediction(probs=draws["probs"].mean(0))
            labels = self._observations(draws).long()
            k = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
            one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype if x.is_floating_point() else torch.get_default_dtype())
            return TeacherPrediction(probs=one_hot.mean(0))
        if "mean" in draws and "variance" in draws:
            mean, variance = mixture_moments(draws["mean"], draws["variance"])
        else:
            mean, variance = mixture_moments(self._observations(draws).to(x.dtype))
        return TeacherPrediction(mean=mean, variance=variance)

    def _observations(self, draws):
        if self.site not in draws:
            raise ValueError(f"the posterior's predictive has no site {self.site!r} (it has {sorted(draws)}); pass site=")
        return draws[self.site]


def as_teacher(teacher, task: str | Task | None = None, num_samples: int = 100) -> Teacher:
    """Wraps a module, a list of modules, or a ``Posterior`` as a :class:`Teacher`.

    Args:
        teacher: ``nn.Module`` | list/tuple of ``nn.Module`` | ``Posterior`` | :class:`Teacher`.
        task: ``"classification"`` (default for modules) or ``"regression"``.
        num_samples: posterior draws per prediction, for a ``Posterior``.

    Examples:
        >>> t = as_teacher([torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)])
        >>> t.predict(torch.zeros(4, 3)).probs.shape
        torch.Size([4, 2])
    """
    from bmm_ppl.inference.posterior import Posterior

    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, Posterior):
        return PosteriorTeacher(teacher, num_samples=num_samples, task=task)
    task = Task.CLASSIFICATION if task is None else task
    if isinstance(teacher, torch.nn.Module):
        return ModuleTeacher(teacher, task)
    if isinstance(teacher, (list, tuple)) and all(isinstance(m, torch.nn.Module) for m in teacher):
        return EnsembleTeacher(teacher, task)
    raise TypeError(
        f"teacher must be an nn.Module, a list of nn.Modules or a Posterior, got {type(teacher).__name__}"
    )
