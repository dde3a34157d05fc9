"""Distillation losses: Hinton's tempered soft-target loss and its Gaussian regression analogue.

Conventions (fixed here, used everywhere in :mod:`bmm_ppl.distillation`):

* ``weight`` (λ) multiplies the **hard-label** term; ``1 − λ`` multiplies the soft (teacher) term:
  ``loss = λ · CE(targets, softmax(s)) + (1 − λ) · T² · KL(softmax(t/T) ‖ softmax(s/T))``.
  The hard term is taken at temperature 1. Without ``targets`` there is no hard term and the soft term
  gets the full weight: ``loss = T² · KL(...)`` (``weight`` is then ignored).
* All losses are means over the batch (the first dimension).
* The T² factor keeps the soft term's gradient magnitude independent of T. Its two limits (tested in
  ``tests/distillation/test_losses.py``):

  - T → ∞: ``T² · KL → ‖s̄ − t̄‖² / (2K)`` where ``s̄ = s − mean(s)`` and ``t̄`` are the centred logits
    and K the number of classes (expand ``softmax(z/T) = (1 + z̄/T)/K + O(T⁻²)``: the KL becomes half
    the χ² divergence, ``½ Σ_k K (t̄_k − s̄_k)² / (K² T²)``). Hinton et al. (2015), §2.1.
  - T → 0: ``softmax(t/T)`` tends to the one-hot of the teacher's arg-max, so
    ``KL(softmax(t/T) ‖ softmax(s/T)) − CE(argmax t, softmax(s/T)) → 0``: the soft term becomes
    cross-entropy with the teacher's hard labels (at the student's temperature T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmm_ppl.validation import check_tensor


def tempered_probabilities(logits: torch.Tensor | None = None, *, probs: torch.Tensor | None = None, temperature: float = 1.0):
    """``softmax(logits / T)``; from probabilities, ``p^(1/T) / Σ p^(1/T)`` (the same thing for ``log p``).

    Args:
        logits: Tensor[n, K], or
        probs: Tensor[n, K] rows summing to one (e.g. a posterior predictive mixture).
        temperature: T > 0.

    Returns:
        Tensor[n, K] of probabilities.

    Examples:
        >>> tempered_probabilities(probs=torch.tensor([[0.5, 0.5]]), temperature=3.0)
        tensor([[0.5000, 0.5000]])
    """
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits= and probs=")
    if logits is None:
        logits = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return torch.softmax(logits / temperature, dim=-1)


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    weight: float = 0.5,
    *,
    teacher_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss for classification.

    ``λ · CE(targets, softmax(s)) + (1 − λ) · T² · KL(softmax(t/T) ‖ softmax(s/T))`` with ``λ = weight``;
    without ``targets`` just ``T² · KL(...)``. The teacher is given as logits or as probabilities
    (``teacher_probs``, e.g. a posterior predictive mixture, which has no single set of logits).

    Args:
        student_logits: Tensor[n, K].
        teacher_logits: Tensor[n, K], or ``None`` with ``teacher_probs``.
        targets: optional integer labels Tensor[n].
        temperature: T > 0.
        weight: λ in [0, 1], the weight of the hard-label term (used only with ``targets``).
        teacher_probs: Tensor[n, K] teacher probabilities, instead of ``teacher_logits``.

    Returns:
        scalar Tensor, the batch mean.

    Examples:
        >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
        >>> round(float(hinton_loss(s, t, temperature=4.0)), 6)
        0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    check_tensor("student_logits", student_logits, dim=2)
    teacher = teacher_logits if teacher_logits is not None else teacher_probs
    if teacher is None or (teacher_logits is not None and teacher_probs is not None):
        raise ValueError("give exactly one of teacher_logits and teacher_probs")
    name = "teacher_logits" if teacher_logits is not None else "teacher_probs"
    check_tensor(name, teacher, dim=2)
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but {name} has {tuple(teacher.shape)}; they must match"
        )
    if targets is not None and targets.shape != student_logits.shape[:1]:
        raise ValueError(f"targets must be Tensor[{student_logits.shape[0]}] of labels, got shape {tuple(targets.shape)}")
    return unchecked_hinton_loss(student_logits, teacher_logits, teacher_probs, targets, temperature, weight)


def unchecked_hinton_loss(student_logits, teacher_logits, teacher_probs, targets, temperature, weight):
    """:func:`hinton_loss` without the argument checks (which synchronise a GPU): for training loops."""
    target_probs = tempered_probabilities(teacher_logits, probs=teacher_probs, temperature=temperature)
    student_log_probs = torch.log_softmax(student_logits / temperature, dim=-1)
    # KL(p ‖ q) = Σ p log p − Σ p log q, with 0 log 0 = 0.
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * student_log_probs).sum(-1).mean()
    soft = temperature**2 * kl
    if targets is None:
        return soft
    hard = F.cross_entropy(student_logits, targets)
    return weight * hard + (1.0 - weight) * soft


def mixture_moments(means: torch.Tensor, variances: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of an equally weighted mixture of Gaussians (or of point masses).

    Args:
        means: Tensor[S, n] component means (one row per posterior draw or ensemble member).
        variances: Tensor[S, n] component variances, or ``None`` for point masses (draws).

    Returns:
        ``(mean, variance)``, each Tensor[n]: ``E[μ_s]`` and ``E[σ²_s] + Var[μ_s]`` (population variance).

    Examples:
        >>> mixture_moments(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
        (tensor([1.]), tensor([2.]))
    """
    mean = means.mean(0)
    variance = (means - mean).pow(2).mean(0)
    if variances is not None:
        variance = variance + variances.mean(0)
    return mean, variance


def gaussian_distillation_loss(
    student_mean: torch.Tensor,
    student_log_variance: torch.Tensor,
    teacher_mean: torch.Tensor,
    teacher_variance: torch.Tensor,
    *,
    kind: str = "nll",
) -> torch.Tensor:
    """Regression distillation: a Gaussian student matched to the teacher's predictive mixture.

    ``kind="nll"`` is the student's negative log-likelihood in expectation under the teacher,
    ``E_{y∼teacher}[−log N(y; μ_s, σ²_s)] = ½ [log 2π σ²_s + (σ²_t + (μ_t − μ_s)²) / σ²_s]``, which depends
    on the teacher (any mixture) only through its mean μ_t and variance σ²_t, so it is exact for a
    mixture given its moments (:func:`mixture_moments`). ``kind="kl"`` subtracts the entropy of the
    moment-matched Gaussian ``N(μ_t, σ²_t)``, giving ``KL(N(μ_t, σ²_t) ‖ N(μ_s, σ²_s))`` — the same
    gradients for the student, but zero at a perfect match (needs σ²_t > 0).

    Args:
        student_mean: Tensor[n], the student's predictive mean.
        student_log_variance: Tensor[n], the log of the student's predictive variance.
        teacher_mean: Tensor[n], the teacher's predictive mean.
        teacher_variance: Tensor[n], the teacher's predictive variance.
        kind: ``"nll"`` or ``"kl"``.

    Returns:
        scalar Tensor, the batch mean.

    Examples:
        >>> z = torch.zeros(3)
        >>> float(gaussian_distillation_loss(z, z, z, torch.ones(3), kind="kl"))
        0.0
    """
    for name, value in (
        ("student_mean", student_mean),
        ("student_log_variance", student_log_variance),
        ("teacher_mean", teacher_mean),
        ("teacher_variance", teacher_variance),
    ):
        check_tensor(name, value, dim=1)
    if not (student_mean.shape == student_log_variance.shape == teacher_mean.shape == teacher_variance.shape):
        raise ValueError(
            "student_mean, student_log_variance, teacher_mean and teacher_variance must have the same shape, got "
            f"{tuple(student_mean.shape)}, {tuple(student_log_variance.shape)}, {tuple(teacher_mean.shape)}, "
            f"{tuple(teacher_variance.shape)}"
        )
    if kind not in ("nll", "kl"):
        raise ValueError(f"kind={kind!r} is not one of 'nll', 'kl'")
    return unchecked_gaussian_distillation_loss(student_mean, student_log_variance, teacher_mean, teacher_variance, kind)


def unchecked_gaussian_distillation_loss(student_mean, student_log_variance, teacher_mean, teacher_variance, kind="nll"):
    """:func:`gaussian_distillation_loss` without the argument checks: for training loops."""
    expected_sq = teacher_variance + (teacher_mean - student_mean).pow(2)
    nll = 0.5 * (student_log_variance + expected_sq * torch.exp(-student_log_variance) + torch.log(2 * torch.pi * torch.ones_like(student_mean)))
    if kind == "nll":
        return nll.mean()
    entropy = 0.5 * torch.log(2 * torch.pi * torch.e * teacher_variance)
    return (nll - entropy).mean()
