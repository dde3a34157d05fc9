"""Training a student network to reproduce a teacher's predictive distribution (``distill``)."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from bmm_ppl.distillation.losses import unchecked_gaussian_distillation_loss, unchecked_hinton_loss, gaussian_distillation_loss
from bmm_ppl.distillation.teachers import PosteriorTeacher, Task, Teacher, TeacherPrediction, as_teacher
from bmm_ppl.inference.errors import ConvergenceWarning, DivergenceError
from bmm_ppl.validation import check_tensor


class GaussianPerturbation:
    """Inputs drawn around training inputs: ``x_i + scale · sd · ε`` with ``ε ∼ N(0, I)``.

    ``sd`` is the per-feature standard deviation of ``x`` (``relative=True``) or one (``relative=False``).
    Each epoch yields ``batches_per_epoch`` batches (default: one pass over ``x``), each of rows drawn at
    random with replacement.

    Args:
        x: Tensor[n, ...] training inputs.
        scale: noise scale.
        batches_per_epoch: batches per epoch; ``None`` for ``ceil(n / batch_size)``.
        relative: scale the noise by each feature's standard deviation.

    Examples:
        >>> source = GaussianPerturbation(torch.zeros(10, 3), scale=0.5, relative=False)
        >>> [b.shape for b in source.batches(4)]
        [torch.Size([4, 3]), torch.Size([4, 3]), torch.Size([4, 3])]
    """

    def __init__(self, x: torch.Tensor, scale: float = 0.1, batches_per_epoch: int | None = None, relative: bool = True):
        self.x = check_tensor("x", x)
        self.scale = float(scale)
        self.batches_per_epoch = batches_per_epoch
        self.sd = x.std(0, keepdim=True) if (relative and x.shape[0] > 1) else torch.ones_like(x[:1])

    def sample(self, batch_size: int) -> torch.Tensor:
        rows = torch.randint(0, self.x.shape[0], (batch_size,), device=self.x.device)
        base = self.x[rows]
        return base + self.scale * self.sd * torch.randn_like(base)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        count = self.batches_per_epoch or -(-self.x.shape[0] // batch_size)
        for _ in range(count):
            yield self.sample(batch_size)


@dataclass
class DistillationResult:
    """What :func:`distill` returns.

    Attributes:
        student: the trained student (the one with the best held-out loss when there was a held-out set).
        agreement: teacher–student agreement on held-out (or training) inputs, plain floats; see
            :func:`agreement`.
        loss_trace: Tensor[epochs] mean training loss per epoch.
        validation_trace: Tensor[epochs] held-out loss per epoch, or ``None``.
        epochs_run: epochs actually run.
        stopped_early: whether early stopping ended the run.
        converged: whether the monitored loss stopped improving (by more than ``tol``) for ``patience``
            epochs before the epoch cap.
        diagnostics: ``epochs_run``, ``best_epoch`` (1-based), ``best_loss`` (the monitored loss there),
            ``monitored`` (``"validation"`` or ``"training"``), ``converged``, ``final_lr``,
            ``num_train`` and ``num_validation`` (rows; ``None`` for non-tensor sources).
    """

    student: torch.nn.Module
    agreement: dict
    loss_trace: torch.Tensor
    validation_trace: torch.Tensor | None = None
    epochs_run: int = 0
    stopped_early: bool = False
    diagnostics: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return bool(self.diagnostics.get("converged", self.stopped_early))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.agreement.items())
        return f"DistillationResult(epochs_run={self.epochs_run}, converged={self.converged}, {shown})"


def _student_device(student: torch.nn.Module) -> torch.device:
    for tensor in student.parameters():
        return tensor.device
    raise ValueError("student has no parameters to train")


def check_student_output(output: torch.Tensor, task: Task, num_classes: int | None, rows: int) -> None:
    """Raises a ValueError naming the student when its output cannot be matched to the teacher's."""
    if task is Task.CLASSIFICATION:
        if output.dim() != 2 or output.shape[0] != rows or (num_classes is not None and output.shape[1] != num_classes):
            want = f"[{rows}, {num_classes}]" if num_classes is not None else f"[{rows}, K]"
            raise ValueError(f"student output has shape {tuple(output.shape)} but the teacher's predictions need Tensor{want} logits")
    elif output.shape != (rows, 2):
        raise ValueError(f"a regression student must output Tensor[{rows}, 2] (mean, log-variance), got {tuple(output.shape)}")


def distillation_loss(output: torch.Tensor, teacher: TeacherPrediction, task: Task, temperature: float = 1.0, targets=None, weight: float = 0.5):
    """The loss :func:`distill` minimises for one batch (Hinton's, or the Gaussian expected NLL), unchecked."""
    # The unchecked forms: argument checks would synchronise the device on every step.
    if task is Task.CLASSIFICATION:
        if teacher.logits is not None:
            return unchecked_hinton_loss(output, teacher.logits, None, targets, temperature, weight)
        return unchecked_hinton_loss(output, None, teacher.probs, targets, temperature, weight)
    return unchecked_gaussian_distillation_loss(output[:, 0], output[:, 1], teacher.mean, teacher.variance)


@torch.no_grad()
def agreement(teacher, student: torch.nn.Module, x: torch.Tensor, task=None, batch_size: int = 1024, num_samples: int = 100) -> dict:
    """Teacher–student agreement on inputs ``x``, as plain floats.

    Classification: ``top1_agreement`` (fraction of rows with the same arg-max) and ``mean_kl``
    (mean KL(teacher ‖ student) in nats). Regression: ``mean_rmse`` (RMS difference of predictive means),
    ``std_rmse`` (of predictive standard deviations) and ``mean_kl`` (KL between the moment-matched
    teacher Gaussian and the student's, where the teacher variance is positive).

    Args:
        teacher: anything :func:`as_teacher` accepts. student: the network. x: Tensor[n, ...].
    """
    teacher = as_teacher(teacher, task, num_samples)
    was_training = student.training
    student.eval()
    try:
        prediction = _predict_all(teacher, x, batch_size)
        output = torch.cat([student(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    finally:
        student.train(was_training)
    if teacher.task is Task.CLASSIFICATION:
        log_q = torch.log_softmax(output, -1)
        p = prediction.probs
        kl = (torch.xlogy(p, p) - p * log_q).sum(-1).mean()
        top1 = (p.argmax(-1) == output.argmax(-1)).to(output.dtype).mean()
        return {"top1_agreement": float(top1), "mean_kl": float(kl)}
    mean_s, var_s = output[:, 0], output[:, 1].exp()
    mean_t, var_t = prediction.mean, prediction.variance
    out = {
        "mean_rmse": float((mean_s - mean_t).pow(2).mean().sqrt()),
        "std_rmse": float((var_s.sqrt() - var_t.sqrt()).pow(2).mean().sqrt()),
    }
    if bool((var_t > 0).all()):
        out["mean_kl"] = float(gaussian_distillation_loss(mean_s, output[:, 1], mean_t, var_t, kind="kl"))
    return out


def _predict_all(teacher: Teacher, x: torch.Tensor, batch_size: int) -> TeacherPrediction:
    return TeacherPrediction.concatenate([teacher.predict(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _first(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def distill(
    teacher,
    student: torch.nn.Module,
    inputs,
    *,
    task=None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    weight: float = 0.5,
    epochs: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 128,
    validation_fraction: float = 0.1,
    validation_inputs: torch.Tensor | None = None,
    patience: int | None = 50,
    tol: float = 1e-4,
    lr_factor: float = 0.5,
    num_samples: int = 100,
    steps_per_epoch: int | None = None,
    optimizer: Callable | None = None,
    progress: bool = True,
) -> DistillationResult:
    """Trains ``student`` to reproduce ``teacher``'s predictive distribution on ``inputs``.

    Classification minimises :func:`~bmm_ppl.distillation.hinton_loss` (soft term only, unless
    ``targets`` are given, weighted by ``weight``); regression minimises the Gaussian expected NLL of
    :func:`~bmm_ppl.distillation.gaussian_distillation_loss` (the student outputs Tensor[n, 2]: mean and
    log-variance). Everything runs on the device of the student's parameters; tensor inputs must be on it.

    By default it trains to convergence: ``validation_fraction`` of tensor inputs is held out, and
    training stops once the held-out distillation loss has not improved by more than ``tol`` for
    ``patience`` epochs, returning the student of the best epoch. The learning rate is multiplied by
    ``lr_factor`` each time ``patience // 2`` epochs pass without improvement (a plateau schedule), so the
    last epochs average out the minibatch noise. ``epochs`` is a cap: a run that reaches it while the loss
    is still improving issues a :class:`~bmm_ppl.inference.ConvergenceWarning`. Without a held-out set
    (a non-tensor source and no ``validation_inputs``, or ``validation_fraction=0``) the mean training
    loss of each epoch is monitored instead.

    Args:
        teacher: an ``nn.Module`` (logits), a list of modules (an ensemble), or a ``Posterior`` (its
            predictive mixture over ``num_samples`` draws; see :mod:`bmm_ppl.distillation.teachers`).
        student: the ``nn.Module`` to train (in place; it is also returned).
        inputs: Tensor[n, ...] (teacher predictions are computed once and cached), a ``DataLoader`` or
            any iterable of batches (tensors or tuples whose first item is the input), an object with a
            ``batches(batch_size)`` method (e.g. :class:`GaussianPerturbation`), a callable
            ``inputs(batch_size) -> Tensor`` called ``steps_per_epoch`` times per epoch, or a Python
            generator (possibly infinite) of which each epoch takes ``steps_per_epoch`` batches.
        task: ``"classification"`` or ``"regression"`` (default: the teacher's, classification for modules).
        targets: optional labels Tensor[n] for tensor inputs (adds Hinton's hard term).
        temperature: Hinton's temperature T.
        weight: Hinton's λ, which weighs the hard term.
        epochs: the epoch cap.
        lr: Adam's initial learning rate (unless ``optimizer`` builds another optimiser from the
            parameters).
        batch_size: the minibatch size.
        validation_fraction: share of tensor inputs held out for early stopping and the agreement report.
        validation_inputs: Tensor[m, ...] held-out inputs instead.
        patience: stop after this many epochs without an improvement larger than ``tol``; ``None`` runs
            all ``epochs`` (no early stopping and no warning: a fixed schedule chosen by the caller).
        tol: the smallest decrease of the monitored loss (nats per row) that counts as an improvement.
        lr_factor: plateau decay of the learning rate, in (0, 1]; 1 keeps it constant.
        steps_per_epoch: batches per epoch for a callable or iterator source (an iterable's full length
            when ``None``).
        progress: show a tqdm bar over epochs.

    Returns:
        :class:`DistillationResult` with the trained ``.student``, ``.agreement`` and ``.diagnostics``.

    Raises:
        DivergenceError: the training loss became non-finite.

    Warns:
        ConvergenceWarning: the epoch cap was reached while the monitored loss was still improving.

    Examples:
        >>> _ = torch.manual_seed(0); teacher = torch.nn.Linear(3, 4); student = torch.nn.Linear(3, 4)
        >>> result = distill(teacher, student, torch.randn(256, 3), lr=0.03, progress=False)
        >>> result.converged, result.agreement["top1_agreement"] > 0.9
        (True, True)
    """
    if not isinstance(student, torch.nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    teacher = as_teacher(teacher, task, num_samples)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got epochs={epochs}, batch_size={batch_size}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be a positive number of epochs or None, got {patience}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    if not 0.0 < lr_factor <= 1.0:
        raise ValueError(f"lr_factor must lie in (0, 1], got {lr_factor}")
    device = _student_device(student)
    teacher_device = teacher.device()
    if teacher_device is not None and teacher_device != device:
        raise ValueError(f"teacher is on {teacher_device} but student is on {device}; put them on one device")

    # ---------------------------------------------------------------- sources
    train_x = cached = None
    if isinstance(inputs, torch.Tensor):
        train_x = check_tensor("inputs", inputs)
        if train_x.device != device:
            raise ValueError(f"inputs are on {train_x.device} but the student is on {device}; move one of them")
        if targets is not None and targets.shape != train_x.shape[:1]:
            raise ValueError(f"targets must be Tensor[{train_x.shape[0]}], got shape {tuple(targets.shape)}")
        held = int(round(validation_fraction * train_x.shape[0]))
        if validation_inputs is None and 0 < held < train_x.shape[0]:
            order = torch.randperm(train_x.shape[0], device=device)
            validation_inputs, train_x = train_x[order[:held]], train_x[order[held:]]
            targets = None if targets is None else targets[order[held:]]
    elif targets is not None:
        raise ValueError("targets can only be given with tensor inputs")
    if validation_inputs is not None:
        check_tensor("validation_inputs", validation_inputs)
        if validation_inputs.device != device:
            raise ValueError(f"validation_inputs are on {validation_inputs.device} but the student is on {device}")

    def epoch_batches():
        if train_x is not None:
            order = torch.randperm(train_x.shape[0], device=device)
            for i in range(0, train_x.shape[0], batch_size):
                rows = order[i : i + batch_size]
                yield train_x[rows], rows
        elif hasattr(inputs, "batches"):
            for batch in inputs.batches(batch_size):
                yield batch, None
        elif callable(inputs):
            if steps_per_epoch is None:
                raise ValueError("a callable inputs source needs steps_per_epoch")
            for _ in range(steps_per_epoch):
                yield inputs(batch_size), None
        else:
            # A re-iterable (DataLoader) restarts each epoch; a one-shot iterator (a Python generator) is
            # consumed across epochs, ``steps_per_epoch`` batches at a time.
            source = iter(inputs)
            for batch in itertools.islice(source, steps_per_epoch):
                yield _first(batch), None

    # ------------------------------------------------- shapes and the teacher
    if train_x is not None:
        probe = train_x[: min(batch_size, train_x.shape[0])]
    elif not hasattr(inputs, "batches") and not callable(inputs) and iter(inputs) is inputs:
        # A one-shot iterator: its first batch is put back in front, so that it is trained on too.
        first = next(inputs, None)
        if first is None:
            raise ValueError("inputs is an empty iterator")
        probe = _first(first)
        inputs = itertools.chain([first], inputs)
    else:
        probe = next(iter(epoch_batches()))[0]
    check_tensor("inputs", probe)
    if probe.device != device:
        raise ValueError(f"inputs are on {probe.device} but the student is on {device}; move one of them")
    student.eval()  # the probe must not move BatchNorm running statistics
    with torch.no_grad():
        probe_out = student(probe)
    if teacher.task is None:  # a Posterior teacher without task=: it tells from its predictive sites
        teacher.predict(probe[:2])
    task = teacher.task
    if isinstance(teacher, PosteriorTeacher) and task is Task.CLASSIFICATION and teacher.num_classes is None and probe_out.dim() == 2:
        teacher.num_classes = probe_out.shape[1]
    probe_teacher = teacher.predict(probe)
    num_classes = probe_teacher.probs.shape[1] if task is Task.CLASSIFICATION else None
    check_student_output(probe_out, task, num_classes, probe.shape[0])
    if train_x is not None:
        cached = _predict_all(teacher, train_x, batch_size)
    validation_teacher = _predict_all(teacher, validation_inputs, batch_size) if validation_inputs is not None else None

    def validation_loss():
        student.eval()
        with torch.no_grad():
            out = torch.cat([student(validation_inputs[i : i + batch_size]) for i in range(0, validation_inputs.shape[0], batch_size)])
        student.train()
        return distillation_loss(out, validation_teacher, task, temperature)

    # ------------------------------------------------------------------ loop
    optim = optimizer(student.parameters()) if optimizer is not None else torch.optim.Adam(student.parameters(), lr=lr)
    monitored = "validation" if validation_inputs is not None else "training"
    plateau = max(1, patience // 2) if patience is not None else None
    losses, val_losses = [], []
    best, best_epoch, best_state, since_best, since_decay, stopped_early = None, 0, None, 0, 0, False
    student.train()
    bar = tqdm(range(epochs), disable=not progress, desc="distill")
    for _epoch in bar:
        total = torch.zeros((), device=device, dtype=probe_out.dtype)
        count = 0
        for x, rows in epoch_batches():
            target = cached.select(rows) if rows is not None else teacher.predict(x)
            y = targets[rows] if (targets is not None and rows is not None) else None
            loss = distillation_loss(student(x), target, task, temperature, y, weight)
            optim.zero_grad()
            loss.backward()
            # Optimisers create their step counters on the default device: keep them with the student.
            with torch.device(device):
                optim.step()
            total = total + loss.detach()
            count += 1
        if count == 0:
            raise ValueError(
                f"inputs yielded no batches in epoch {_epoch + 1}: an exhausted iterator? Pass a DataLoader, a "
                "GaussianPerturbation, a callable, or a generator with steps_per_epoch"
            )
        losses.append(total / max(count, 1))
        # One synchronisation per epoch, to catch divergence and decide early stopping.
        if not bool(torch.isfinite(losses[-1])):
            raise DivergenceError(f"distillation loss became non-finite in epoch {_epoch + 1} (check the inputs and lr)")
        if validation_inputs is not None:
            val_losses.append(validation_loss())
            current = float(val_losses[-1])
            bar.set_postfix(loss=float(losses[-1]), validation=current)
        else:
            current = float(losses[-1])
            bar.set_postfix(loss=current)
        if best is None or current < best - tol:
            best, best_epoch, since_best, since_decay = current, _epoch + 1, 0, 0
            if validation_inputs is not None:  # the held-out best is the student returned
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            since_best += 1
            since_decay += 1
        if patience is None:
            continue
        if since_best >= patience:
            stopped_early = True
            break
        if since_decay >= plateau and lr_factor < 1:
            for group in optim.param_groups:
                group["lr"] *= lr_factor
            since_decay = 0
    if best_state is not None:
        student.load_state_dict(best_state)
    converged = stopped_early
    if patience is not None and not converged:
        warnings.warn(
            f"distill reached the epoch cap (epochs={epochs}) while the {monitored} distillation loss was still "
            f"improving (best {best:.4g} at epoch {best_epoch}, {since_best} epochs ago; patience={patience}): the "
            "student is undertrained; raise epochs or lr",
            ConvergenceWarning,
            stacklevel=2,
        )

    report_x = validation_inputs if validation_inputs is not None else (train_x if train_x is not None else probe)
    report = agreement(teacher, student, report_x, batch_size=batch_size)
    return DistillationResult(
        student=student,
        agreement=report,
        loss_trace=torch.stack(losses),
        validation_trace=torch.stack(val_losses) if val_losses else None,
        epochs_run=len(losses),
        stopped_early=stopped_early,
        diagnostics={
            "epochs_run": len(losses),
            "best_epoch": best_epoch,
            "best_loss": best,
            "monitored": monitored,
            "converged": converged,
            "final_lr": float(optim.param_groups[0]["lr"]),
            "num_train": None if train_x is None else int(train_x.shape[0]),
            "num_validation": None if validation_inputs is None else int(validation_inputs.shape[0]),
        },
    )
