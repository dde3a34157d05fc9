"""What the engines' L-BFGS searches share: a closure that turns a numerically singular trial point into a
finite penalty, so that a line search backs off instead of failing."""

from __future__ import annotations

import math
from typing import Callable

import torch


def backing_off_closure(optimiser: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The closure ``torch.optim.LBFGS.step`` calls: zero the gradients, evaluate ``loss_fn()``, back-propagate.

    Where ``loss_fn`` raises ``torch.linalg.LinAlgError`` (a line-search probe left the positive-definite
    cone numerically: a Cholesky factor of a covariance or precision failed), the closure answers with a
    finite penalty above the best value so far, which sends the search back toward it.

    Examples:
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> optimiser = torch.optim.LBFGS([x], line_search_fn="strong_wolfe")
        >>> _ = optimiser.step(backing_off_closure(optimiser, lambda: (x - 1).pow(2).sum()))
        >>> round(float(x.detach()), 4)
        1.0
    """
    best = [math.inf]

    def closure():
        optimiser.zero_grad()
        try:
            loss = loss_fn()
        except torch.linalg.LinAlgError:
            return torch.as_tensor(best[0] + 1e6 if math.isfinite(best[0]) else 1e30)
        loss.backward()
        best[0] = min(best[0], float(loss.detach()))
        return loss

    return closure


__all__ = ["backing_off_closure"]
