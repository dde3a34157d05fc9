"""Data-free distillation: record a teacher's activation statistics, then synthesise inputs that match them.

Following the "activation records" of Lopes, Fenu & Starner (2017) and the BatchNorm matching of
DeepInversion (Yin et al. 2020):

1. :func:`record_activation_statistics` runs the teacher over its training data once with forward
   hooks (the module is not edited) and keeps, per chosen layer, the mean and covariance of its output
   features (channels for convolutions, pooled over positions); a layer wider than ``max_full_dim`` keeps
   only its mean and the top ``rank`` eigenpairs of its covariance (a spectral summary). BatchNorm
   layers already carry running statistics of their inputs; those are used as they are. The result is a
   plain :class:`ActivationStatistics` (tensors and strings only, ``state_dict``-serialisable) that can
   be attached to the teacher.
2. :func:`synthesize_inputs` starts from Gaussian noise and optimises the inputs until a batch's
   statistics at every recorded layer (and every BatchNorm) match the records; optionally it also asks
   each input to be classified as an assigned class (``class_weight``, DeepInversion's term), which
   spreads the inputs over the classes.
3. :func:`~bmm_ppl.distillation.distill` on those inputs alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from bmm_ppl.validation import check_tensor

_ATTRIBUTE = "activation_statistics"
_RECORDED_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_BATCHNORM_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _features(output: torch.Tensor) -> torch.Tensor:
    """Rows of features: Tensor[n, d] as is; channels pooled over positions for Tensor[n, C, ...]."""
    if output.dim() <= 2:
        return output.reshape(output.shape[0], -1)
    return output.transpose(0, 1).reshape(output.shape[1], -1).T


@dataclass
class ActivationStatistics:
    """Per-layer activation records of a teacher, as plain tensors.

    Attributes:
        layers: ``{layer name: {"mean": Tensor[d], "covariance": Tensor[d, d]}`` or, for wide layers,
            ``{"mean": Tensor[d], "basis": Tensor[d, r], "eigenvalues": Tensor[r]}``.
        batchnorm: names of the BatchNorm layers whose running statistics are to be matched.
        input_shape: the shape of one input (no data is kept).
        num_samples: how many inputs the records were computed from.
    """

    layers: dict = field(default_factory=dict)
    batchnorm: list = field(default_factory=list)
    input_shape: tuple = ()
    num_samples: int = 0

    def state_dict(self) -> dict:
        """Tensors, numbers, strings, lists and dicts only (``torch.load(..., weights_only=True)`` reads it)."""
        return {
            "layers": {n: dict(v) for n, v in self.layers.items()},
            "batchnorm": list(self.batchnorm),
            "input_shape": list(self.input_shape),
            "num_samples": int(self.num_samples),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ActivationStatistics":
        return cls(dict(state["layers"]), list(state["batchnorm"]), tuple(state["input_shape"]), int(state["num_samples"]))

    def attach(self, module: torch.nn.Module) -> torch.nn.Module:
        """Stores these statistics on ``module`` (as the attribute ``activation_statistics``); returns it."""
        object.__setattr__(module, _ATTRIBUTE, self)
        return module

    def __repr__(self) -> str:
        return f"ActivationStatistics(layers={list(self.layers)}, batchnorm={self.batchnorm}, num_samples={self.num_samples})"


def statistics_of(teacher: torch.nn.Module) -> ActivationStatistics:
    """The statistics attached to ``teacher``, or a ValueError saying how to record them."""
    stats = getattr(teacher, _ATTRIBUTE, None)
    if not isinstance(stats, ActivationStatistics):
        raise ValueError(
            "teacher has no recorded activation statistics: call record_activation_statistics(teacher, data) "
            "(which attaches them) or pass statistics="
        )
    return stats


def _default_layers(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, _RECORDED_TYPES)]


def _batches(data, batch_size):
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size]
    else:
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def record_activation_statistics(
    module: torch.nn.Module,
    data,
    layers: list[str] | None = None,
    *,
    max_full_dim: int = 512,
    rank: int = 64,
    batch_size: int = 512,
    attach: bool = True,
) -> ActivationStatistics:
    """Records the mean and covariance of chosen layers' outputs while ``module`` sees ``data``.

    Args:
        module: any ``nn.Module`` (run in eval mode; its mode is restored afterwards).
        data: Tensor[n, ...] inputs, or an iterable of batches (tensors or tuples whose first item is one).
        layers: names from ``module.named_modules()``; default every Linear and Conv layer.
        max_full_dim: layers with more output features keep a rank-``rank`` spectral summary instead of
            the full covariance.
        rank: the number of leading eigenpairs kept for wide layers.
        batch_size: batch size for tensor ``data``.
        attach: store the result on ``module`` (see :meth:`ActivationStatistics.attach`).

    Returns:
        :class:`ActivationStatistics`.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        >>> stats = record_activation_statistics(net, torch.randn(100, 3))
        >>> sorted(stats.layers), stats.layers["0"]["covariance"].shape
        (['0', '2'], torch.Size([5, 5]))
    """
    named = dict(module.named_modules())
    layers = _default_layers(module) if layers is None else list(layers)
    unknown = [n for n in layers if n not in named]
    if unknown:
        raise ValueError(f"layers {unknown} are not submodules of the module (it has {sorted(n for n in named if n)})")
    if not layers:
        raise ValueError("no layers to record: the module has no Linear/Conv layer; name some with layers=")
    sums: dict[str, list] = {}

    def hook_for(name):
        def hook(_module, _inputs, output):
            rows = _features(output)
            if name not in sums:
                sums[name] = [0, torch.zeros_like(rows[0]), rows.new_zeros(rows.shape[1], rows.shape[1])]
            sums[name][0] += rows.shape[0]
            sums[name][1] += rows.sum(0)
            sums[name][2] += rows.T @ rows

        return hook

    handles = [named[n].register_forward_hook(hook_for(n)) for n in layers]
    was_training = module.training
    module.eval()
    total, input_shape = 0, None
    try:
        for batch in _batches(data, batch_size):
            check_tensor("data", batch)
            input_shape = tuple(batch.shape[1:])
            total += batch.shape[0]
            module(batch)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    if total < 2:
        raise ValueError(f"data must hold at least 2 inputs to estimate covariances, got {total}")
    records = {}
    for name in layers:
        count, first, second = sums[name]
        mean = first / count
        covariance = second / count - torch.outer(mean, mean)
        covariance = 0.5 * (covariance + covariance.T)
        if mean.shape[0] > max_full_dim:
            eigenvalues, vectors = torch.linalg.eigh(covariance)
            keep = min(rank, mean.shape[0])
            records[name] = {"mean": mean, "basis": vectors[:, -keep:].contiguous(), "eigenvalues": eigenvalues[-keep:].clamp_min(0)}
        else:
            records[name] = {"mean": mean, "covariance": covariance}
    batchnorm = [n for n, m in named.items() if isinstance(m, _BATCHNORM_TYPES) and m.track_running_stats and m.running_mean is not None]
    stats = ActivationStatistics(records, batchnorm, input_shape, total)
    if attach:
        stats.attach(module)
    return stats


def statistics_loss(features: torch.Tensor, record: dict) -> torch.Tensor:
    """Scale-free mismatch between a batch's features Tensor[b, d] and a layer record.

    ``‖μ_b − μ‖² / (tr C / d) / d + ‖C_b − C‖²_F / ‖C‖²_F`` for a full record; for a spectral one the
    same in the recorded basis U, against ``diag(eigenvalues)``.
    """
    mean = features.mean(0)
    centred = features - mean
    if "covariance" in record:
        target_mean, target_cov = record["mean"], record["covariance"]
        cov = centred.T @ centred / features.shape[0]
        diff_mean = mean - target_mean
    else:
        basis = record["basis"]
        projected = centred @ basis
        cov = projected.T @ projected / features.shape[0]
        target_cov = torch.diag(record["eigenvalues"])
        diff_mean = (mean - record["mean"]) @ basis
    scale = torch.diagonal(target_cov).mean().clamp_min(1e-12)
    mean_term = diff_mean.pow(2).mean() / scale
    cov_term = (cov - target_cov).pow(2).sum() / target_cov.pow(2).sum().clamp_min(1e-24)
    return mean_term + cov_term


def synthesize_inputs(
    teacher: torch.nn.Module,
    statistics: ActivationStatistics | None = None,
    num_inputs: int = 512,
    steps: int = 200,
    *,
    lr: float = 0.05,
    batch_size: int = 256,
    class_weight: float = 0.0,
    input_shape: tuple | None = None,
    like: torch.Tensor | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Optimises Gaussian-noise inputs until the teacher's recorded activation statistics are matched.

    Each batch of ``batch_size`` inputs is optimised for ``steps`` Adam steps on the sum over recorded
    layers of :func:`statistics_loss`, plus DeepInversion's BatchNorm term (batch mean and variance of
    each BatchNorm's input against its running statistics), plus ``class_weight`` times the teacher's
    cross-entropy for a class assigned to each input in turn (classification teachers; 0 disables).

    Args:
        teacher: the ``nn.Module`` (not edited; its parameters receive no gradients).
        statistics: :class:`ActivationStatistics`; default the ones attached to ``teacher``.
        num_inputs: how many inputs to make.
        steps: optimisation steps per batch.
        lr: Adam learning rate on the inputs.
        batch_size: inputs optimised jointly (their statistics are compared with the records).
        class_weight: weight of the assigned-class cross-entropy.
        input_shape: the shape of one input; default the recorded one.
        like: a tensor whose device and dtype the inputs take (default: the teacher's parameters').
        progress: tqdm bar over batches.

    Returns:
        Tensor[num_inputs, *input_shape].

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        >>> _ = record_activation_statistics(net, torch.randn(100, 3))
        >>> synthesize_inputs(net, num_inputs=10, steps=5, progress=False).shape
        torch.Size([10, 3])
    """
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    stats = statistics_of(teacher) if statistics is None else statistics
    if not isinstance(stats, ActivationStatistics):
        raise TypeError(f"statistics must be ActivationStatistics, got {type(stats).__name__}")
    if num_inputs < 1 or steps < 1 or batch_size < 2:
        raise ValueError(f"need num_inputs >= 1, steps >= 1, batch_size >= 2, got {num_inputs}, {steps}, {batch_size}")
    named = dict(teacher.named_modules())
    missing = [n for n in list(stats.layers) + list(stats.batchnorm) if n not in named]
    if missing:
        raise ValueError(f"statistics name layers {missing} that the teacher does not have")
    shape = tuple(input_shape if input_shape is not None else stats.input_shape)
    reference = like if like is not None else next(iter(teacher.parameters()))
    records = {n: {k: v.to(device=reference.device, dtype=reference.dtype) for k, v in r.items()} for n, r in stats.layers.items()}

    captured: dict[str, torch.Tensor] = {}

    def output_hook(name):
        def hook(_module, _inputs, output):
            captured[name] = output

        return hook

    def input_hook(name):
        def hook(_module, inputs):
            captured["bn:" + name] = inputs[0]

        return hook

    handles = [named[n].register_forward_hook(output_hook(n)) for n in stats.layers]
    handles += [named[n].register_forward_pre_hook(input_hook(n)) for n in stats.batchnorm]
    was_training = teacher.training
    teacher.eval()
    made = []
    try:
        starts = range(0, num_inputs, batch_size)
        for start in tqdm(starts, disable=not progress, desc="synthesise"):
            count = min(batch_size, num_inputs - start)
            x = torch.randn((max(count, 2),) + shape, device=reference.device, dtype=reference.dtype).requires_grad_(True)
            labels = None
            optim = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                logits = teacher(x)
                loss = sum(statistics_loss(_features(captured[n]), r) for n, r in records.items())
                for name in stats.batchnorm:
                    bn = named[name]
                    rows = _features(captured["bn:" + name])
                    loss = loss + (rows.mean(0) - bn.running_mean).pow(2).mean() / bn.running_var.mean() + (
                        rows.var(0, unbiased=False) / bn.running_var - 1
                    ).pow(2).mean()
                if class_weight > 0:
                    if labels is None:
                        labels = (torch.arange(x.shape[0], device=x.device) + start) % logits.shape[-1]
                    loss = loss + class_weight * torch.nn.functional.cross_entropy(logits, labels)
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                with torch.device(reference.device):  # the optimiser's step counter follows the inputs
                    optim.step()
            made.append(x.detach()[:count])
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    out = torch.cat(made)
    if not bool(torch.isfinite(out).all()):
        from bmm_ppl.inference.errors import DivergenceError

        raise DivergenceError("input synthesis diverged (non-finite inputs); lower lr")
    return out
