"""Capture a pure tensor function as one simplified graph that runs without Python overhead.

The hot loops of the samplers call small functions (a leapfrog step with its bookkeeping, a potential
and its gradient) thousands of times on small tensors, where PyTorch's per-operation dispatch, not the
arithmetic, sets the cost. :func:`capture` records such a function's operations once with
``make_fx`` (functionalised: no in-place operations, so the graph can be rewritten safely), simplifies
the graph, and hands it to ``torch.jit.trace`` + ``torch.jit.freeze`` so each call runs in TorchScript's
interpreter. The simplifications, each checked against the recorded values:

* constant folding: every operation that depends on no input value (including ``zeros_like`` and the
  like of an input, whose shape is fixed by the capture) is computed once and stored;
* identities: ``alias``/``clone``/``detach``, a view or expand to the shape it already has,
  multiplication or division by 1, addition or subtraction of 0, and ``neg(neg(x))``;
* common-subexpression elimination (random operations excepted) and dead-code elimination;
* matrix products: ``sum(a * b, dims)`` over a large broadcast product that is a matrix product (the
  ``(x * w).sum(-1)`` of a linear predictor, and its gradient) becomes one ``mm``, and chains of reshapes
  collapse into one;
* cheaper formulas while recording: ``binary_cross_entropy_with_logits`` (``Bernoulli(logits).log_prob``)
  is recorded as ``softplus(l) - y * l``, seven operations with its gradient instead of about 25.

On the CPU the frozen graph then runs on PyTorch's Static Runtime (less overhead per operation than the
TorchScript interpreter: about 20% on a NUTS leaf), where it builds and reproduces the graph.

The captured function is specialised to the example inputs' shapes, dtypes and device; randomness
inside it (``torch.rand_like`` ...) stays random and draws from the global generator of that device.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from bmm_ppl.capture_state import is_capturing, recording

aten = torch.ops.aten

_SHAPE_ONLY = {  # value depends on the input's shape, dtype and device only
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
}
_ALIASES = {aten.alias.default, aten.clone.default, aten.detach.default, aten.lift_fresh_copy.default}
_RESHAPES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.view_copy.default, aten.expand_copy.default, aten.unsqueeze.default, aten.unsqueeze_copy.default,
    aten.squeeze.dim, aten.squeeze.default, aten.squeeze_copy.dim,
}




class _CheaperFormulas(TorchFunctionMode):
    """While recording, replaces a few composite functions whose recorded form (and its gradient) is
    long with an equal one that records in fewer operations.

    ``binary_cross_entropy_with_logits(l, y)`` (``Bernoulli(logits=...).log_prob``) records as about 25
    operations with its gradient; ``softplus(l) - y * l`` (``softplus`` switching to ``l`` only where
    ``exp(-l)`` is below the dtype's resolution) records as seven.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.binary_cross_entropy_with_logits:
            cheaper = _softplus_cross_entropy(*args, **kwargs)
            if cheaper is not None:
                return cheaper
        return func(*args, **kwargs)


def _softplus_cross_entropy(logits, target, weight=None, size_average=None, reduce=None, reduction="mean",
                            pos_weight=None):
    if weight is not None or pos_weight is not None or size_average is not None or reduce is not None:
        return None
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        return None
    threshold = 40.0 if logits.dtype == torch.float64 else 20.0
    losses = F.softplus(logits, threshold=threshold) - target * logits
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def _is_random(node: torch.fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    return False


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once and keeps every node's value (for shapes and constant folding)."""

    def __init__(self, module):
        super().__init__(module)
        self.values: dict[torch.fx.Node, object] = {}

    def run_node(self, node):
        value = super().run_node(node)
        self.values[node] = value
        return value


def _same_tensor_type(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device)


def _fold_constants(module: torch.fx.GraphModule, values: dict) -> set:
    graph = module.graph
    constant: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op == "call_function" and not _is_random(node):
            inputs = node.all_input_nodes
            if node.target in _SHAPE_ONLY or all(n in constant for n in inputs):
                constant.add(node)
    count = 0
    for node in list(graph.nodes):
        if node not in constant or node.op == "get_attr":
            continue
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            continue
        if not any(user not in constant for user in node.users):
            continue  # only the frontier is stored; the rest dies below
        if any(user.op == "output" for user in node.users):
            continue  # an output stays computed from the inputs (the tracer needs it to depend on them)
        name = f"_folded_{count}"
        count += 1
        module.register_buffer(name, value.detach().clone())
        with graph.inserting_before(node):
            replacement = graph.get_attr(name)
        values[replacement] = value
        node.replace_all_uses_with(replacement)
    return constant


def _remove_unused(graph: torch.fx.Graph, constant: set) -> None:
    """Dead-code elimination that also drops in-place operations on folded constants (the functional
    graph has no other mutation)."""
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        mutates = isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
        if not mutates or node in constant:
            graph.erase_node(node)


def _scalar_equals(arg, number: float, values: dict | None = None) -> bool:
    """Whether ``arg`` is the number, or a constant tensor (folded or a buffer) filled with it."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg) == number
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and values is not None:
        value = values.get(arg)
        return isinstance(value, torch.Tensor) and value.numel() > 0 and bool((value == number).all())
    return False


def _identity_source(node: torch.fx.Node, values: dict):
    """The node's input when the node is an identity (by the recorded values), else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    source, target, out = node.args[0], node.target, values.get(node)
    if not _same_tensor_type(out, values.get(source)):
        return None
    if target in _ALIASES or target in _RESHAPES:
        return source
    if len(node.args) == 2 and not node.kwargs:
        other = node.args[1]
        if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) and _scalar_equals(other, 1.0, values):
            return source
        if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar) and _scalar_equals(other, 0.0, values):
            return source
        if target in (aten.mul.Tensor, aten.add.Tensor) and _scalar_equals(source, 1.0 if target is aten.mul.Tensor else 0.0, values):
            other_value = values.get(other)
            if isinstance(other, torch.fx.Node) and _same_tensor_type(out, other_value):
                return other
    if target is aten.pow.Tensor_Scalar and _scalar_equals(node.args[1], 1.0):
        return source
    if target is aten.neg.default and isinstance(source, torch.fx.Node) and source.target is aten.neg.default:
        return source.args[0]
    return None


def _contraction_dims(shape_l, shape_r, reduced: set, full_shape):
    """Splits the dimensions of the product ``l * r`` (shaped ``full_shape``; the factors aligned right)
    into those kept from ``l`` only, kept from ``r`` only, and contracted (in both, summed); size-1
    dimensions are dropped. ``None`` where the product is not a matrix product: a dimension kept in both,
    summed in one only, or broadcast from neither factor (an ``expand`` of both)."""
    rank = len(full_shape)
    shape_l = (1,) * (rank - len(shape_l)) + tuple(shape_l)
    shape_r = (1,) * (rank - len(shape_r)) + tuple(shape_r)
    left, right, contracted = [], [], []
    for dim, (size_l, size_r) in enumerate(zip(shape_l, shape_r)):
        if max(size_l, size_r) != full_shape[dim]:
            return None
        if size_l == 1 and size_r == 1:
            continue
        if dim in reduced:
            if size_l != size_r:
                return None
            contracted.append(dim)
        elif size_l > 1 and size_r > 1:
            return None
        else:
            (left if size_l > 1 else right).append(dim)
    return (left, right, contracted, shape_l, shape_r) if contracted else None


def _as_matrix(graph, node, values, module, rows: list, cols: list, padded_shape) -> torch.fx.Node:
    """``node`` rearranged as a matrix (its ``rows`` dimensions by its ``cols`` dimensions, row-major); a
    constant is rearranged once and stored contiguous."""
    order = [d for d in range(len(padded_shape)) if padded_shape[d] > 1]
    squeezed = [padded_shape[d] for d in order]
    permutation = [order.index(d) for d in rows + cols]
    shape = [_product(padded_shape[d] for d in rows), _product(padded_shape[d] for d in cols)]
    value = values[node].reshape(squeezed).permute(permutation).reshape(shape)
    if node.op == "get_attr":
        name = f"_matrix_{len(list(module.buffers()))}"
        module.register_buffer(name, value.contiguous())
        result = graph.get_attr(name)
    else:
        result = graph.call_function(aten.reshape.default, (node, squeezed))
        if permutation != sorted(permutation):
            result = graph.call_function(aten.permute.default, (result, permutation))
        result = graph.call_function(aten.reshape.default, (result, shape))
    values[result] = value
    return result


def _product(sizes) -> int:
    result = 1
    for size in sizes:
        result *= size
    return result


_MIN_CONTRACTION_SIZE = 1024


def _contract_products(module: torch.fx.GraphModule, values: dict) -> None:
    """``sum(a * b, dims)`` that is a matrix product (e.g. ``(x * w).sum(-1)`` for ``x @ w``, and its
    gradient) becomes one ``mm``: the broadcast product is never materialised."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.target is not aten.sum.dim_IntList or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        product = node.args[0]
        if product.target is not aten.mul.Tensor or len(product.users) != 1 or product.kwargs:
            continue
        operands = [a.args[0] if isinstance(a, torch.fx.Node) and a.target is aten.expand.default else a
                    for a in product.args]
        out, full = values.get(node), values.get(product)
        operand_values = [values.get(a) if isinstance(a, torch.fx.Node) else None for a in operands]
        if not all(isinstance(v, torch.Tensor) for v in operand_values + [out, full]):
            continue
        if not full.is_floating_point() or any(v.dtype != full.dtype for v in operand_values):
            continue
        if full.numel() < _MIN_CONTRACTION_SIZE:  # small: the reshapes around mm would cost more than they save
            continue
        keepdim = len(node.args) > 2 and bool(node.args[2])
        rank = full.dim()
        dims = node.args[1] if len(node.args) > 1 else None
        reduced = {d % rank for d in dims} if dims else set(range(rank))
        # The constant (if any) on the right: BLAS reads it contiguous.
        l_node, r_node = operands if operands[0].op != "get_attr" else operands[::-1]
        split = _contraction_dims(values[l_node].shape, values[r_node].shape, reduced, tuple(full.shape))
        if split is None:
            continue
        left, right, contracted, shape_l, shape_r = split
        with graph.inserting_before(node):
            matrix_l = _as_matrix(graph, l_node, values, module, left, contracted, shape_l)
            matrix_r = _as_matrix(graph, r_node, values, module, contracted, right, shape_r)
            result = graph.call_function(aten.mm.default, (matrix_l, matrix_r))
            value = torch.mm(values[matrix_l], values[matrix_r])
            values[result] = value
            kept = left + right
            if kept != sorted(kept):  # back to the dimensions' order
                sizes = [full.shape[d] for d in kept]
                result = graph.call_function(aten.reshape.default, (result, sizes))
                permutation = [kept.index(d) for d in sorted(kept)]
                result = graph.call_function(aten.permute.default, (result, permutation))
                values[result] = value = value.reshape(sizes).permute(permutation)
            result = graph.call_function(aten.reshape.default, (result, list(out.shape)))
            values[result] = value.reshape(out.shape)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        graph.erase_node(product)


_PURE_RESHAPES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default,
    aten.unsqueeze.default, aten.unsqueeze_copy.default, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze_copy.dim,
}


def _collapse_reshapes(graph: torch.fx.Graph, values: dict) -> None:
    """A reshape of a reshape (view, unsqueeze, squeeze ...) becomes one reshape of the first one's input."""
    for node in graph.nodes:
        if node.target not in _PURE_RESHAPES or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if source.target in _PURE_RESHAPES and isinstance(values.get(node), torch.Tensor):
            node.target = aten.reshape.default
            node.args = (source.args[0], list(values[node].shape))
            node.kwargs = {}


def _remove_identities(graph: torch.fx.Graph, values: dict) -> None:
    for node in list(graph.nodes):
        source = _identity_source(node, values)
        if source is not None:
            node.replace_all_uses_with(source)


def _eliminate_common_subexpressions(graph: torch.fx.Graph) -> None:
    seen: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or _is_random(node):
            continue
        try:
            key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        except Exception:  # noqa: BLE001 - an unprintable argument: leave the node alone
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
        else:
            seen[key] = node


def simplify(module: torch.fx.GraphModule, example_args: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """Folds constants, removes identities and repeated subexpressions of a functional ``make_fx`` graph
    in place (see the module docstring); returns the module."""
    recorder = _Recorder(module)
    with torch.no_grad():
        recorder.run(*example_args)
    values = recorder.values
    constant = _fold_constants(module, values)
    _contract_products(module, values)
    for _ in range(2):
        _collapse_reshapes(module.graph, values)
        _remove_identities(module.graph, values)
        _eliminate_common_subexpressions(module.graph)
        _remove_unused(module.graph, constant)
    module.graph.lint()
    module.recompile()
    return module


def graph_size(module: torch.fx.GraphModule) -> int:
    """The number of operations (``call_function`` nodes) of a graph."""
    return sum(node.op == "call_function" for node in module.graph.nodes)


def trace_function(fn: Callable, example_args: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """``fn``'s operations on ``example_args`` as a functional (no in-place) ``make_fx`` graph, simplified."""
    with torch.no_grad(), recording(), _CheaperFormulas():
        module = make_fx(torch.func.functionalize(fn, remove="mutations"))(*example_args)
    module.graph.eliminate_dead_code()
    module.recompile()
    return simplify(module, example_args)


def capture(fn: Callable, example_args: Sequence[torch.Tensor]) -> Callable:
    """``fn`` (tensors in, a tuple of tensors out, no side effects) as one TorchScript graph specialised to
    ``example_args``' shapes, dtypes and device (on the CPU run by Static Runtime where it reproduces the
    graph; a later call never overwrites an earlier call's outputs).

    Raises whatever the capture raises (e.g. data-dependent control flow under ``make_fx``); callers
    check the captured function against ``fn`` before trusting it.

    Examples:
        >>> f = capture(lambda x: (torch.sin(x) * 1.0 + 0.0, x.exp()), [torch.zeros(3)])
        >>> [t.shape for t in f(torch.ones(3))]
        [torch.Size([3]), torch.Size([3])]
    """
    return capture_with_graph(fn, example_args)[0]


def capture_with_graph(fn: Callable, example_args: Sequence[torch.Tensor]) -> tuple[Callable, torch.fx.GraphModule]:
    """As :func:`capture`, also returning the simplified ``make_fx`` graph: a plain function of aten
    operations, which a larger function can call and be captured again quickly (without re-running
    whatever Python ``fn`` ran, e.g. a Pyro model)."""
    # Distinct storage per input: the tracer would otherwise take two aliased example inputs for one.
    example_args = [arg.clone() for arg in example_args]
    cuda = sorted({arg.device for arg in example_args if arg.device.type == "cuda"}, key=str)
    # Recording runs the function (and its random operations): the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = trace_function(fn, example_args)
        traced = torch.jit.trace(module, tuple(example_args), check_trace=False)
        try:
            traced = torch.jit.freeze(traced.eval())
        except Exception:  # noqa: BLE001 - freezing only folds attributes; the traced graph is equivalent
            pass
        if all(arg.device.type == "cpu" for arg in example_args):
            traced = _on_static_runtime(traced, example_args)
    return traced, module


class _StaticRuntimeGraph:
    """A frozen TorchScript graph run by PyTorch's Static Runtime (CPU): the same operations, with less
    per-operation overhead (no dispatcher round trip for most operations, intermediate buffers reused
    across calls; outputs are never overwritten by a later call, though an input passed straight through
    is returned as itself, as in TorchScript)."""

    def __init__(self, scripted):
        self.scripted = scripted
        self.graph = scripted.graph
        self._static = torch._C._jit_to_static_module(scripted._c)

    def __call__(self, *args):
        return self._static(*args)


def _on_static_runtime(scripted, example_args):
    """``scripted`` on Static Runtime when that builds and reproduces it on the example (same random
    numbers), else ``scripted``."""
    try:
        static = _StaticRuntimeGraph(scripted)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            expected = scripted(*example_args)
            torch.manual_seed(0)
            got = static(*example_args)
    except Exception:  # noqa: BLE001 - an operation Static Runtime cannot run: keep TorchScript
        return scripted
    expected, expected_structure = torch.utils._pytree.tree_flatten(expected)
    got, got_structure = torch.utils._pytree.tree_flatten(got)
    same = expected_structure == got_structure and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        and bool(torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True)))
        for a, b in zip(expected, got)
    )
    return static if same else scripted


def agrees(value: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to rounding: ``|value - reference| <= rtol (|reference| + max |reference|)`` elementwise (a
    sum's rounding error scales with its largest terms, so small entries get the large ones' absolute
    tolerance); non-finite entries must match exactly.

    Examples:
        >>> agrees(torch.tensor([1.0, 1e-9]), torch.tensor([1.0, 0.0])), agrees(torch.ones(1), 2 * torch.ones(1))
        (True, False)
    """
    if value.shape != reference.shape:
        return False
    finite = torch.isfinite(reference)
    largest = float(reference[finite].abs().max()) if bool(finite.any()) else 0.0
    return bool(torch.allclose(value, reference, rtol=rtol, atol=rtol * largest + 1e-12, equal_nan=True))


def capture_checked(fn: Callable, example_args: Sequence[torch.Tensor], probe_args: Sequence[torch.Tensor],
                    reference: Callable, rtol: float = 1e-5, seed: int | None = None, with_graph: bool = False):
    """``fn`` captured at ``example_args`` (:func:`capture_with_graph`, with Pyro's argument validation off
    and warnings silenced while recording) and trusted only if, at ``probe_args``, every output
    :func:`agrees` with ``reference(*probe_args)`` (the eager computation; ``None`` outputs of the
    reference count as zeros). The one place where engines capture a graph and check it.

    Args:
        seed: for stochastic functions (an ELBO): both are run from this seed, so they draw the same
            random numbers; the caller's random state is left as it was.
        with_graph: also return the simplified ``make_fx`` graph.

    Returns:
        the captured function (``(captured, graph)`` with ``with_graph``), or ``None`` where ``fn`` cannot
        be captured (it raised while recording, e.g. on value-dependent control flow) or disagrees.

    Examples:
        >>> f = capture_checked(lambda x: (x.exp(),), [torch.zeros(2)], [torch.ones(2)], lambda x: (x.exp(),))
        >>> f(torch.ones(2))[0]
        tensor([2.7183, 2.7183])
    """
    import pyro

    probe_args = list(probe_args)
    devices = sorted({a.device for a in probe_args if a.device.type == "cuda"}, key=str)
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captured, graph = capture_with_graph(fn, list(example_args))
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            got = captured(*probe_args)
            if seed is not None:
                torch.manual_seed(seed)
            expected = reference(*probe_args)
    except Exception:  # noqa: BLE001 - a function that cannot be captured runs eagerly
        return None
    got, expected = tuple(got), tuple(expected)
    if len(got) != len(expected):
        return None
    for a, b in zip(got, expected):
        b = torch.zeros_like(a) if b is None else b.detach()
        if not agrees(a, b, rtol):
            return None
    return (captured, graph) if with_graph else captured


__all__ = ["agrees", "capture", "capture_checked", "capture_with_graph", "graph_size", "is_capturing", "simplify",
           "trace_function"]
