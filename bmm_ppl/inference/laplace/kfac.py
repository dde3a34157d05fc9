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

    Example:
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


class LayerFactors(NamedTuple):
    """What a weight's Kronecker block is built from, fixed at the mode.

    Attributes:
        site: the weight's site name.
        activations: Tensor[a_in, a_in], ``A``.
        output_gradients: Tensor[K, N', out]: the ``g`` that ``G = einsum(g, Lambda, g)`` contracts
            (``N' = N T`` for expand, ``N`` for reduce), with ``point``: LongTensor[N'] the data point of each row.
        transposed: the weight is ``[in, out]`` (``x @ w``): its block is ``kron(A, G)``, else ``kron(G, A)``.
    """

    site: str
    activations: torch.Tensor
    output_gradients: torch.Tensor
    point: torch.Tensor
    transposed: bool


class BiasFactors(NamedTuple):
    """A bias's exact block: ``sum_n s_n^T Lambda_n s_n`` with ``s_n`` (Tensor[K, N, out]) the summed ``g``."""

    site: str
    output_gradients: torch.Tensor


def gauss_newton_factor(output_gradients: torch.Tensor, point: torch.Tensor | None, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_r g_r^T Lambda_{n(r)} g_r``: Tensor[out, out] from ``g`` Tensor[K, R, out] and ``Lambda``
    Tensor[N, K, K] (``point[r]`` the data point of row ``r``; ``None``: row ``r`` is point ``r``).

    Example:
        >>> g = torch.ones(1, 2, 3); gauss_newton_factor(g, None, torch.full((2, 1, 1), 0.5))[0]
        tensor([1., 1., 1.])
    """
    weights = blocks if point is None else blocks[point]
    return torch.einsum("kro,rkl,lrp->op", output_gradients, weights, output_gradients)


def record_layers(run: Callable[[], tuple[dict, torch.Tensor]], sites: list[str], approximation: KFACApproximation,
                  num_outputs: int, directional: Callable[[str, torch.Tensor], torch.Tensor]
                  ) -> tuple[list[LayerFactors], list[BiasFactors], torch.Tensor]:
    """Runs the program once under a :class:`LinearLayerRecorder`, backpropagates the ``K`` outputs, and
    checks the recorded layers against the program (:func:`check_factors`).

    Args:
        run: ``() -> (site values {name: Tensor}, output Tensor[N, ...])``, with the latents requiring grad.
        sites: the latent sites to look for among the layers' weights and biases.
        approximation: expand or reduce.
        num_outputs: ``K``.
        directional: ``(site, V) -> Tensor[N, K]``, the output's exact derivative along ``V`` in that site.

    Returns:
        ``(weights, biases, output)``: the factors of every site used by exactly one layer (a site used by
        several is left out: the caller gives it a dense block), and the output Tensor[N, K].

    Raises:
        UnsupportedModelError: a layer's site fails the check.
    """
    with LinearLayerRecorder() as recorder:
        values, output = run()
    n = output.shape[0]
    flat_output = output.reshape(n, num_outputs)
    uses: dict[str, list[tuple[LinearCall, str]]] = {}
    by_id = {id(values[s]): s for s in sites}
    for call in recorder.calls:
        for role, tensor in (("weight", call.weight), ("bias", call.bias)):
            if tensor is not None and id(tensor) in by_id:
                uses.setdefault(by_id[id(tensor)], []).append((call, role))
    single = {s: u[0] for s, u in uses.items() if len(u) == 1}
    calls = list({id(c.output): c for c, _ in single.values()}.values())
    if not calls:
        return [], [], flat_output.detach()
    gradients = [[] for _ in calls]
    for k in range(num_outputs):
        grads = torch.autograd.grad(flat_output[:, k].sum(), [c.output for c in calls], retain_graph=True, allow_unused=True)
        for store, grad, call in zip(gradients, grads, calls):
            store.append(torch.zeros_like(call.output) if grad is None else grad)
    by_output = {id(c.output): torch.stack(g).detach() for c, g in zip(calls, gradients)}  # [K, N, *S, out]

    weights, biases, rebuilders = [], [], {}
    for site, (call, role) in single.items():
        g = by_output[id(call.output)]
        shared = math.prod(g.shape[2:-1])
        g = g.reshape(num_outputs, n, shared, g.shape[-1])
        summed = g.sum(2)
        if role == "bias":
            biases.append(BiasFactors(site, summed))
            rebuilders[site] = lambda v, summed=summed: torch.einsum("kno,o->nk", summed, v)
            continue
        a = call.input.detach().reshape(n, shared, call.input.shape[-1])
        pattern = "knto,io,nti->nk" if call.transposed else "knto,oi,nti->nk"
        rebuilders[site] = lambda v, g=g, a=a, pattern=pattern: torch.einsum(pattern, g, v, a)
        if approximation is KFACApproximation.EXPAND:
            activations = torch.einsum("nti,ntj->ij", a, a) / (n * shared)
            rows = g.reshape(num_outputs, n * shared, g.shape[-1])
            point = torch.arange(n, device=g.device).repeat_interleave(shared)
        else:
            mean = a.mean(1)
            activations = mean.T @ mean / n
            rows, point = summed, torch.arange(n, device=g.device)
        weights.append(LayerFactors(site, activations, rows, point, call.transposed))
    check_factors(rebuilders, directional, {s: values[s] for s in rebuilders})
    weights.sort(key=lambda f: sites.index(f.site))
    biases.sort(key=lambda f: sites.index(f.site))
    return weights, biases, flat_output.detach()


def check_factors(rebuilders: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                  directional: Callable[[str, torch.Tensor], torch.Tensor], like: dict[str, torch.Tensor]) -> None:
    """Refuses, by name, a layer site whose recorded ``(a, g)`` do not reproduce the output's derivative.

    Args:
        rebuilders: ``{site: V -> Tensor[N, K]}``, the derivative along ``V`` as the layer's factors give it.
        directional: ``(site, V) -> Tensor[N, K]``, the exact derivative of the output along ``V``.
        like: ``{site: its value}`` (shape, dtype and device of ``V``).

    Raises:
        UnsupportedModelError: naming the site.
    """
    for site, rebuild in rebuilders.items():
        direction = torch.randn_like(like[site].detach())
        exact = directional(site, direction)
        rebuilt = rebuild(direction)
        error = float((exact - rebuilt).abs().max())
        if error > 1e-6 * max(1.0, float(exact.abs().max())):
            raise UnsupportedModelError(
                f"KFAC needs site {site!r} to enter the output only as the weight or bias of one linear layer (F.linear / "
                f"nn.Linear or x @ w) whose data points are independent, but its derivative differs from the "
                f"layer's by {error:.3g} (the weight is used elsewhere too, or the layer mixes data points, e.g. "
                "batch norm): use hessian='full' or 'diag', or subset= without it"
            )


__all__ = ["BiasFactors", "LayerFactors", "LinearCall", "LinearLayerRecorder", "MAX_DENSE_SITE", "check_factors",
           "gauss_newton_factor", "record_layers"]
