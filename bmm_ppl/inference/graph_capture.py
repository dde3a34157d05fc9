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
* common-subexpression elimination (random operations excepted) and dead-code elimination.

The captured function is specialised to the example inputs' shapes, dtypes and device; randomness
inside it (``torch.rand_like`` ...) stays random and draws from the global generator of that device.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

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


_capturing = [False]


def is_capturing() -> bool:
    """Whether a graph is being recorded now: value checks (``if bad.any(): raise``) must be skipped, since
    a data-dependent branch cannot be recorded (the data were checked before capture)."""
    return _capturing[0]


@contextlib.contextmanager
def _recording():
    previous, _capturing[0] = _capturing[0], True
    try:
        yield
    finally:
        _capturing[0] = previous


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
    for _ in range(2):
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
    with torch.no_grad(), _recording():
        module = make_fx(torch.func.functionalize(fn, remove="mutations"))(*example_args)
    module.graph.eliminate_dead_code()
    module.recompile()
    return simplify(module, example_args)


def capture(fn: Callable, example_args: Sequence[torch.Tensor]) -> Callable:
    """``fn`` (tensors in, a tuple of tensors out, no side effects) as one TorchScript graph specialised to
    ``example_args``' shapes, dtypes and device.

    Raises whatever the capture raises (e.g. data-dependent control flow under ``make_fx``); callers
    check the captured function against ``fn`` before trusting it.

    Example:
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
    return traced, module


__all__ = ["capture", "capture_with_graph", "graph_size", "is_capturing", "simplify", "trace_function"]
