"""Graph capture: the simplified graph computes what the function computes, with fewer operations."""

import pytest
import torch

from bmm_ppl.inference.graph_capture import capture, graph_size, is_capturing, trace_function
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
