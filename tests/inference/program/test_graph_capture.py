"""Graph capture: the simplified graph computes what the function computes, with fewer operations."""

import pytest
import torch

import torch.nn.functional as F

from bmm_ppl.inference.program.graph_capture import capture, graph_size, is_capturing, trace_function
from bmm_ppl.inference.hmc.nuts_kernel import _checkpoint_masks


def noisy_identities(x, y):
    zero = torch.zeros_like(x)
    scale = torch.ones(3, dtype=x.dtype, device=x.device)
    a = (x * 1.0 + 0.0 - zero) * scale  # identities around x
    b = a.view(3).expand(3).clone()
    c = -(-b)
    constant = torch.arange(3.0, dtype=x.dtype, device=x.device).exp().sum()  # depends on no input value
    return (c * y + constant, torch.sin(c) * torch.sin(c))  # sin(c) twice: one after CSE


def test_simplified_graph_is_smaller_and_equal():
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    module = trace_function(noisy_identities, [x, y])
    targets = [str(n.target) for n in module.graph.nodes if n.op == "call_function"]
    assert graph_size(module) <= 4, targets  # mul, add, sin, mul
    assert sum("sin" in t for t in targets) == 1
    new_x, new_y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for got, expected in zip(module(new_x, new_y), noisy_identities(new_x, new_y)):
        torch.testing.assert_close(got, expected)
    captured = capture(noisy_identities, [x, y])
    for got, expected in zip(captured(new_x, new_y), noisy_identities(new_x, new_y)):
        torch.testing.assert_close(got, expected)


def test_random_operations_stay_random_and_capture_leaves_the_generator_alone():
    def noisy(x):
        return (x + torch.rand_like(x),)

    x = torch.zeros(4)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    captured = capture(noisy, [x])
    torch.testing.assert_close(torch.rand(1), expected_next)  # capturing drew nothing from the caller's stream
    torch.manual_seed(1)
    first = captured(x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(first, noisy(x)[0])  # the same numbers as the eager function
    assert not torch.equal(captured(x)[0], captured(x)[0])


def test_value_checks_are_skipped_only_while_recording():
    seen = []

    def f(x):
        seen.append(is_capturing())
        return (x * 2,)

    capture(f, [torch.ones(2)])
    assert seen and seen[0] is True and not is_capturing()


def test_outputs_that_do_not_depend_on_input_values_still_capture():
    def f(x):
        return (torch.zeros_like(x), torch.full_like(x, -float("inf")), x + 1)

    out = capture(f, [torch.ones(2)])(torch.full((2,), 3.0))
    torch.testing.assert_close(out[2], torch.full((2,), 4.0))
    assert torch.isneginf(out[1]).all()


def _targets(module):
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("chains", [1, 3])
def test_broadcast_products_become_matrix_products(chains):
    """(x * w).sum(-1) and its gradient's (g[..., None] * x).sum(1) are recorded as mm, with the values
    of the eager function (a linear predictor over 200 x 31 data)."""
    torch.manual_seed(0)
    data = torch.randn(200, 31, dtype=torch.float64)

    def linear_and_gradient(w):
        eta = (data * w.unsqueeze(1)).sum(-1)  # (chains, 200)
        return eta, (eta.unsqueeze(-1) * data).sum(1)  # (chains, 31)

    w = torch.randn(chains, 31, dtype=torch.float64)
    module = trace_function(linear_and_gradient, [w])
    targets = _targets(module)
    assert targets.count(torch.ops.aten.mm.default) == 2 and torch.ops.aten.mul.Tensor not in targets, targets
    other = torch.randn(chains, 31, dtype=torch.float64)
    for got, expected in zip(module(other), linear_and_gradient(other)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_products_that_are_not_matrix_products_stay():
    """A dimension kept by both factors (a batch of products) is not a matrix product, nor is one that
    only an expand of a factor creates (summed: it would lose a factor of 64; kept: a wrong shape)."""
    a, b = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    module = trace_function(lambda a, b: ((a * b).sum(-1),), [a, b])
    assert torch.ops.aten.mm.default not in _targets(module)
    torch.testing.assert_close(module(a, b)[0], (a * b).sum(-1))
    x, w = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    for f in (lambda x, w: ((x.expand(64, 32) * w).sum([0, 1]),),
              lambda x, w: ((x.expand(64, 32) * w).sum(-1),),
              lambda x, w: ((x.expand(64, 32) * x).sum(0),)):
        torch.testing.assert_close(capture(f, [x, w])(x, w)[0], f(x, w)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_is_recorded_as_softplus_with_the_same_values_and_gradient(dtype):
    """The cheaper formula agrees with PyTorch's to the dtype's resolution, gradient included, out to
    logits of +-60 where the softplus switches to its linear branch."""
    import pyro.distributions as dist

    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=dtype)

    def log_prob_and_grad(logits):
        return torch.func.grad_and_value(lambda l: dist.Bernoulli(logits=l, validate_args=False).log_prob(labels).sum())(logits)

    logits = torch.tensor([-60.0, -60.0, 0.3, 25.0, 45.0, 60.0], dtype=dtype)
    module = trace_function(log_prob_and_grad, [logits])
    targets = _targets(module)
    assert torch.ops.aten.softplus.default in targets and graph_size(module) <= 8, targets
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for got, expected in zip(module(logits), log_prob_and_grad(logits)):
        torch.testing.assert_close(got, expected, **tolerance)
    # Reductions and weights: sum and mean are rewritten, a weighted loss is left to PyTorch.
    for reduction in ("sum", "mean"):
        f = lambda l: (F.binary_cross_entropy_with_logits(l, labels, reduction=reduction),)  # noqa: E731
        torch.testing.assert_close(trace_function(f, [logits])(logits)[0], f(logits)[0], **tolerance)
    weighted = lambda l: (F.binary_cross_entropy_with_logits(l, labels, weight=labels + 1),)  # noqa: E731
    assert torch.ops.aten.softplus.default not in _targets(trace_function(weighted, [logits]))


def test_cpu_graphs_run_on_static_runtime_with_fresh_outputs_and_the_eager_random_stream():
    from bmm_ppl.inference.program.graph_capture import _StaticRuntimeGraph

    def step(x):
        noise = torch.rand_like(x)
        return (x * 2 + noise, noise.exp())

    x = torch.randn(5, dtype=torch.float64)
    captured = capture(step, [x])
    assert isinstance(captured, _StaticRuntimeGraph)
    first = captured(x)
    kept = [t.clone() for t in first]
    captured(x + 1)  # a second call must not write into the first call's outputs
    for got, expected in zip(first, kept):
        assert torch.equal(got, expected)
    torch.manual_seed(3)
    got = captured(x)
    torch.manual_seed(3)
    for a, b in zip(got, step(x)):
        torch.testing.assert_close(a, b)
    nested = capture(lambda x: (x.exp(), (x.sin(), x.cos())), [x])  # nested outputs too
    assert isinstance(nested, _StaticRuntimeGraph)
    torch.testing.assert_close(nested(x)[1][1], x.cos())


@pytest.mark.parametrize(
    "leaf, store, check",
    [
        (0, [0], []),  # leaf 0 opens checkpoint 0
        (1, [], [0]),  # closes [0, 1]
        (2, [1], []),
        (3, [], [0, 1]),  # closes [2, 3] (checkpoint 1) and [0..3] (checkpoint 0)
        (5, [], [1]),  # closes [4, 5]: leaf 4 sits in checkpoint popcount(4 >> 1) = 1
        (6, [2], []),
        (7, [], [0, 1, 2]),  # closes [6, 7], [4..7], [0..7]
        (13, [], [2]),  # 13 = 0b1101: closes [12, 13]
    ],
)
def test_checkpoint_masks_of_the_iterative_tree(leaf, store, check):
    store_mask, check_mask = _checkpoint_masks(leaf, 5, torch.device("cpu"))
    assert store_mask.shape == (5, 1)
    assert store_mask.flatten().nonzero().flatten().tolist() == store
    assert check_mask.nonzero().flatten().tolist() == check
