"""Kronecker-factored (KFAC) curvature of a Pyro program's linear layers (Martens & Grosse 2015; for the
GGN with weight sharing, "expand" and "reduce", Eschenhagen et al. 2023).

A latent site is a linear layer's weight when the program passes its value to ``F.linear`` (as
``nn.Linear`` does, also under ``torch.func.functional_call``) or as the right operand of ``x @ w``. One
run of the program records, for each such call, its input ``a`` and output ``h``; ``K`` backward passes
from the program's output give ``g_k = d f_k / d h``. The GGN block of the weight is then approximated
by ``kron(G, A)`` with

- expand (each position of a shared dimension, e.g. a sequence, counts as a data point):
  ``A = 1/(N T) sum_{n,t} a_{nt} a_{nt}^T``, ``G = sum_{n,t} g_{nt}^T Lambda_n g_{nt}``;
- reduce (the shared dimension summed first): ``A = 1/N sum_n abar_n abar_n^T`` with ``abar_n`` the
  mean over ``t``, ``G = sum_n (sum_t g_{nt})^T Lambda_n (sum_t g_{nt})``;

(both exact for one data point without sharing), ``Lambda_n`` the likelihood's Hessian in the output. A
bias gets its exact dense block ``sum_n (sum_t g_{nt})^T Lambda_n (sum_t g_{nt})``; any other latent site
its exact dense GGN block. Cross-blocks are dropped (block diagonal).

Before use the factors are checked against the program: for a random direction ``V`` of each weight,
the output's exact directional derivative (forward mode) must equal ``sum_t g_{nt}^T V a_{nt}``; a
weight used anywhere else (tied, scaled, in a second layer), or a layer whose points are not
independent (batch norm), fails the check and is refused by name.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bmm_ppl.inference.errors import UnsupportedModelError
from bmm_ppl.inference.laplace.structures import KFACApproximation

_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
#: The largest latent site outside any linear layer that gets a dense block (its m x m matrix).
MAX_DENSE_SITE = 4096


class LinearCall(NamedTuple):
    """One recorded linear map ``h = a W^T (+ b)`` (``F.linear``) or ``h = a @ W`` (``transposed``)."""

    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    output: torch.Tensor
    transposed: bool


class LinearLayerRecorder(TorchFunctionMode):
    """Records every ``F.linear`` call and every matrix product with a 2-D right operand.

    Examples:
        >>> w = torch.randn(3, 2)
        >>> with LinearLayerRecorder() as recorder:
        ...     h = torch.nn.functional.linear(torch.randn(5, 2), w)
        >>> recorder.calls[0].weight is w, recorder.calls[0].output.shape
        (True, torch.Size([5, 3]))
    """

    def __init__(self):
        super().__init__()
        self.calls: list[LinearCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args)) | kwargs
            self.calls.append(LinearCall(bound["input"], bound["weight"], bound.get("bias"), out, False))
        elif func in _MATMULS and len(args) == 2 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2 \
                and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            self.calls.append(LinearCall(args[0], args[1], None, out, True))
        return out


class LayerRecord(NamedTuple):
    """What one run recorded for a latent site used by exactly one linear layer.

    Attributes:
        site: the site's name.
        is_bias: the site is the layer's bias (else its weight).
        inputs: Tensor[N, T, in], the layer's input (``T`` positions share the weight; 1 without sharing).
        output_gradients: Tensor[K, N, T, out], ``d f_{n,k} / d h_{n,t}``.
        transposed: the weight is ``[in, out]`` (``x @ w``), else ``[out, in]`` (``F.linear``).
    """

    site: str
    is_bias: bool
    inputs: torch.Tensor
    output_gradients: torch.Tensor
    transposed: bool

    def per_point_jacobian(self) -> torch.Tensor:
        """Tensor[N, K, size]: the exact Jacobian of each point's output in the site (``sum_t g a^T``)."""
        g = self.output_gradients
        if self.is_bias:
            return g.sum(2).permute(1, 0, 2)
        pattern = "knto,nti->nkio" if self.transposed else "knto,nti->nkoi"
        jacobian = torch.einsum(pattern, g, self.inputs)
        return jacobian.reshape(jacobian.shape[0], jacobian.shape[1], -1)

    def directional(self, direction: torch.Tensor) -> torch.Tensor:
        """Tensor[N, K]: the output's derivative along ``direction`` (the site's shape) by the record."""
        if self.is_bias:
            return torch.einsum("knto,o->nk", self.output_gradients, direction)
        pattern = "knto,io,nti->nk" if self.transposed else "knto,oi,nti->nk"
        return torch.einsum(pattern, self.output_gradients, direction, self.inputs)


class LayerFactors(NamedTuple):
    """What a weight's Kronecker block is built from, fixed at the mode.

    Attributes:
        site: the weight's site name.
        activations: Tensor[in, in], ``A``.
        output_gradients: Tensor[K, R, out]: the ``g`` that ``G = einsum(g, Lambda, g)`` contracts, with
            ``point``: LongTensor[R] the data point of each row (``R = N T`` for expand, ``N`` for reduce).
        transposed: the weight is ``[in, out]`` (``x @ w``): its block is ``kron(A, G)``, else ``kron(G, A)``.
    """

    site: str
    activations: torch.Tensor
    output_gradients: torch.Tensor
    point: torch.Tensor
    transposed: bool


def kronecker_factors(record: LayerRecord, approximation: KFACApproximation) -> LayerFactors:
    """A weight's KFAC factors by the chosen treatment of its shared dimension (module docstring)."""
    g, a = record.output_gradients, record.inputs
    k, n, shared, out = g.shape
    if approximation is KFACApproximation.EXPAND:
        activations = torch.einsum("nti,ntj->ij", a, a) / (n * shared)
        rows, point = g.reshape(k, n * shared, out), torch.arange(n, device=g.device).repeat_interleave(shared)
    else:
        mean = a.mean(1)
        activations = mean.T @ mean / n
        rows, point = g.sum(2), torch.arange(n, device=g.device)
    return LayerFactors(record.site, activations, rows, point, record.transposed)


def bias_gradients(record: LayerRecord) -> torch.Tensor:
    """Tensor[K, N, out]: a bias's per-point output gradients (summed over a shared dimension), the
    ``s`` of its exact block ``sum_n s_n^T Lambda_n s_n``."""
    return record.output_gradients.sum(2)


def gauss_newton_factor(output_gradients: torch.Tensor, point: torch.Tensor | None, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_r g_r^T Lambda_{n(r)} g_r``: Tensor[out, out] from ``g`` Tensor[K, R, out] and ``Lambda``
    Tensor[N, K, K] (``point[r]`` the data point of row ``r``; ``None``: row ``r`` is point ``r``).

    Examples:
        >>> g = torch.ones(1, 2, 3); gauss_newton_factor(g, None, torch.full((2, 1, 1), 0.5))[0]
        tensor([1., 1., 1.])
    """
    weights = blocks if point is None else blocks[point]
    return torch.einsum("kro,rkl,lrp->op", output_gradients, weights, output_gradients)


def record_layers(run: Callable[[], tuple[dict, torch.Tensor]], sites: list[str], num_outputs: int,
                  directional: Callable[[str, torch.Tensor], torch.Tensor]
                  ) -> tuple[list[LayerRecord], dict[str, float]]:
    """Runs the program once under a :class:`LinearLayerRecorder`, backpropagates the ``K`` outputs to
    every layer output, and checks each record against the program (:func:`mismatched_records`).

    Args:
        run: ``() -> (site values {name: Tensor}, output Tensor[N, ...])``, with the latents requiring grad.
        sites: the latent sites to look for among the layers' weights and biases.
        num_outputs: ``K``.
        directional: ``(site, V) -> Tensor[N, K]``, the output's exact derivative along ``V`` in that site.

    Returns:
        ``(records, mismatched)``: a record per site used by exactly one layer, in the order of ``sites``
        (a site used by several layers, or by none, has none), and ``{site: error}`` for the records that
        fail the check (the caller refuses them or differentiates those sites directly).
    """
    with LinearLayerRecorder() as recorder:
        values, output = run()
    n = output.shape[0]
    flat_output = output.reshape(n, num_outputs)
    uses: dict[str, list[tuple[LinearCall, bool]]] = {}
    by_id = {id(values[s]): s for s in sites}
    for call in recorder.calls:
        for is_bias, tensor in ((False, call.weight), (True, call.bias)):
            if tensor is not None and id(tensor) in by_id:
                uses.setdefault(by_id[id(tensor)], []).append((call, is_bias))
    single = {s: u[0] for s, u in uses.items() if len(u) == 1}
    calls = list({id(c.output): c for c, _ in single.values()}.values())
    if not calls:
        return [], {}
    gradients = [[] for _ in calls]
    for k in range(num_outputs):
        grads = torch.autograd.grad(flat_output[:, k].sum(), [c.output for c in calls], retain_graph=True, allow_unused=True)
        for store, grad, call in zip(gradients, grads, calls):
            store.append(torch.zeros_like(call.output) if grad is None else grad)
    by_output = {id(c.output): torch.stack(g).detach() for c, g in zip(calls, gradients)}  # [K, N, *S, out]
    records = []
    for site in sorted(single, key=sites.index):
        call, is_bias = single[site]
        g = by_output[id(call.output)]
        shared = math.prod(g.shape[2:-1])
        inputs = call.input.detach().reshape(n, shared, call.input.shape[-1])
        records.append(LayerRecord(site, is_bias, inputs, g.reshape(num_outputs, n, shared, g.shape[-1]), call.transposed))
    return records, mismatched_records(records, directional, values)


def mismatched_records(records: list[LayerRecord], directional: Callable[[str, torch.Tensor], torch.Tensor],
                       values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The layer sites whose record does not reproduce the output's exact derivative along a random
    direction (relative 1e-6), with the error: ``{site: error}`` (empty where all agree).

    Args:
        records: the layer records.
        directional: ``(site, V) -> Tensor[N, K]``, the exact derivative of the output along ``V``.
        values: ``{site: its value}`` (shape, dtype and device of ``V``).
    """
    mismatched = {}
    for record in records:
        direction = torch.randn_like(values[record.site].detach())
        exact = directional(record.site, direction)
        error = float((exact - record.directional(direction)).abs().max())
        if error > 1e-6 * max(1.0, float(exact.abs().max())):
            mismatched[record.site] = error
    return mismatched


def refuse_mismatches(mismatched: dict[str, float]) -> None:
    """Raises for the first mismatched layer site (KFAC cannot factor it).

    Raises:
        UnsupportedModelError: naming the site.
    """
    for site, error in mismatched.items():
        raise UnsupportedModelError(
            f"KFAC needs site {site!r} to enter the output only as the weight or bias of one linear layer "
            f"(F.linear / nn.Linear or x @ w) whose data points are independent, but its derivative differs from "
            f"the layer's by {error:.3g} (the weight is used elsewhere too, or the layer mixes data points, e.g. "
            "batch norm): use hessian='full' or 'diag', or subset= without it"
        )


__all__ = ["LayerFactors", "LayerRecord", "LinearCall", "LinearLayerRecorder", "MAX_DENSE_SITE", "bias_gradients",
           "gauss_newton_factor", "kronecker_factors", "mismatched_records", "record_layers", "refuse_mismatches"]
