"""Transition kernels over a batch of chains: multinomial NUTS and fixed-length HMC.

Each kernel is a pure function ``step(point, step_size, inv_mass, potential_and_grad, ...) -> (point, info)``
over ``Tensor[C, D]`` positions; chains advance independently but share every potential evaluation
(one batched call per leapfrog step). ``info`` holds ``Tensor[C]`` statistics: ``accept_prob``,
``diverging``, ``num_steps`` and, for NUTS, ``tree_depth``.

The NUTS kernel is the multinomial variant of Betancourt (2017) with Stan's additional U-turn checks
across merged subtrees: subtrees are built recursively, and a chain whose subtree turns or diverges is
masked out of the rest of that subtree while the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from bmm_ppl.inference.hmc.integrator import PhasePoint, kinetic_energy, leapfrog, sample_momentum

MAX_ENERGY_ERROR = 1000.0  # Stan's threshold on H(new) - H(start) for calling a transition divergent


def _no_turn(r_sharp_begin, r_sharp_end, r_sum):
    """Generalised no-U-turn criterion (Betancourt 2017): Tensor[C] bool, True while not turning."""
    return ((r_sharp_begin * r_sum).sum(-1) > 0) & ((r_sharp_end * r_sum).sum(-1) > 0)


def _script(fn):
    """TorchScript-compiles model-independent arithmetic (as plain Python it costs about as much as a
    traced potential evaluation); TorchScript is deprecated in recent PyTorch, so fall back to Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - TorchScript unavailable: the Python function is equivalent
        return fn


@_script
def _leaf_energy(r_half, grad, potential, step, inv_mass, energy0, max_energy_error: float):
    r_new = r_half - 0.5 * step.unsqueeze(-1) * grad
    energy = potential + 0.5 * (r_new * r_new * inv_mass).sum(-1)
    delta = torch.nan_to_num(energy - energy0, nan=float("inf"))
    log_weight = -delta
    return r_new, log_weight, delta > max_energy_error, torch.clamp(torch.exp(log_weight), max=1.0)


@_script
def _merge_math(first_log_weight, second_log_weight, uniform, first_r_sum, second_r_sum, first_r_inner,
                first_r_outer, second_r_inner, second_r_outer, inv_mass, across: bool):
    log_weight = torch.logaddexp(first_log_weight, second_log_weight)
    take_second = uniform.log() < second_log_weight - log_weight
    r_sum = first_r_sum + second_r_sum
    begin = inv_mass * first_r_inner
    end = inv_mass * second_r_outer
    no_turn = ((begin * r_sum).sum(-1) > 0) & ((end * r_sum).sum(-1) > 0)
    if across:
        rho = first_r_sum + second_r_inner
        no_turn = no_turn & ((begin * rho).sum(-1) > 0) & ((inv_mass * second_r_inner * rho).sum(-1) > 0)
        rho = second_r_sum + first_r_outer
        no_turn = no_turn & ((inv_mass * first_r_outer * rho).sum(-1) > 0) & ((end * rho).sum(-1) > 0)
    return log_weight, take_second, r_sum, ~no_turn


def _pick(mask, a, b):
    return torch.where(mask.unsqueeze(-1) if a.dim() > mask.dim() else mask, a, b)


@dataclasses.dataclass
class _Subtree:
    """A built (sub)trajectory of every chain, oriented along its integration direction."""

    outer: PhasePoint  # last leaf: where the trajectory continues
    r_inner: torch.Tensor  # momentum of the first leaf
    proposal: PhasePoint  # multinomially sampled leaf
    log_weight: torch.Tensor  # log sum over leaves of exp(-(H - H0))
    r_sum: torch.Tensor
    turning: torch.Tensor
    diverging: torch.Tensor
    sum_accept: torch.Tensor
    num_steps: torch.Tensor


class _TreeBuilder:
    """Builds subtrees for every chain at once. ``all_active`` marks the common case in which no chain is
    masked, where the per-chain selections are skipped (they cost as much as the leapfrog itself)."""

    def __init__(self, potential_and_grad, inv_mass, energy0, safe_z):
        self.potential_and_grad = potential_and_grad
        self.inv_mass = inv_mass
        self.energy0 = energy0
        self.safe_z = safe_z
        self.num_chains = energy0.shape[0]

    def leaf(self, start: PhasePoint, step: torch.Tensor, active: torch.Tensor, all_active: bool) -> _Subtree:
        eps = step.unsqueeze(-1)
        r_half = start.r - 0.5 * eps * start.grad
        z_new = start.z + eps * self.inv_mass * r_half
        if not all_active:
            z_new = torch.where(active.unsqueeze(-1), z_new, self.safe_z)
        potential, grad = self.potential_and_grad(z_new)
        r_new, log_weight, diverging, accept = _leaf_energy(
            r_half, grad, potential, step, self.inv_mass, self.energy0, MAX_ENERGY_ERROR
        )
        new = PhasePoint(z_new, r_new, potential, grad)
        if all_active:
            num_steps = torch.ones_like(log_weight)
        else:
            diverging = diverging & active
            log_weight = torch.where(active, log_weight, torch.full_like(log_weight, -math.inf))
            accept = torch.where(active, accept, torch.zeros_like(log_weight))
            num_steps = active.to(log_weight.dtype)
        return _Subtree(
            outer=new, r_inner=new.r, proposal=new, log_weight=log_weight, r_sum=new.r,
            turning=torch.zeros_like(diverging), diverging=diverging, sum_accept=accept, num_steps=num_steps,
        )

    def build(self, start: PhasePoint, step: torch.Tensor, depth: int, active: torch.Tensor, all_active: bool) -> _Subtree:
        if depth == 0:
            return self.leaf(start, step, active, all_active)
        first = self.build(start, step, depth - 1, active, all_active)
        go_on = active & ~first.turning & ~first.diverging
        num_going = int(go_on.sum())  # the one host synchronisation per subtree: stop when no chain goes on
        if num_going == 0:
            return first
        all_go = num_going == self.num_chains
        second = self.build(first.outer, step, depth - 1, go_on, all_go)
        # Stan's checks across the two halves (``depth > 1``; for single leaves they repeat the main one).
        log_weight, take_second, r_sum, turning = _merge_math(
            first.log_weight, second.log_weight, torch.rand_like(first.log_weight), first.r_sum, second.r_sum,
            first.r_inner, first.outer.r, second.r_inner, second.outer.r, self.inv_mass, depth > 1,
        )
        proposal = second.proposal.where(take_second, first.proposal)
        merged = _Subtree(
            outer=second.outer, r_inner=first.r_inner, proposal=proposal, log_weight=log_weight, r_sum=r_sum,
            turning=second.turning | turning, diverging=second.diverging,
            sum_accept=first.sum_accept + second.sum_accept, num_steps=first.num_steps + second.num_steps,
        )
        if all_go:
            return merged
        return _Subtree(
            outer=merged.outer.where(go_on, first.outer),
            r_inner=first.r_inner,
            proposal=merged.proposal.where(go_on, first.proposal),
            log_weight=torch.where(go_on, merged.log_weight, first.log_weight),
            r_sum=_pick(go_on, merged.r_sum, first.r_sum),
            turning=torch.where(go_on, merged.turning, first.turning),
            diverging=torch.where(go_on, merged.diverging, first.diverging),
            sum_accept=torch.where(go_on, merged.sum_accept, first.sum_accept),
            num_steps=torch.where(go_on, merged.num_steps, first.num_steps),
        )


def nuts_step(
    point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor, potential_and_grad, max_tree_depth: int = 10
) -> tuple[PhasePoint, dict[str, torch.Tensor]]:
    """One multinomial NUTS transition of every chain.

    Args:
        point: the current positions (``point.r`` is ignored: momenta are drawn afresh).
        step_size: Tensor[C]; inv_mass: Tensor[C, D] diagonal inverse mass matrices.
        potential_and_grad: ``z: Tensor[C, D] -> (U: Tensor[C], dU/dz: Tensor[C, D])``.
        max_tree_depth: at most ``2**max_tree_depth - 1`` leapfrog steps per transition.

    Returns:
        ``(new_point, info)`` with ``info`` = ``{"accept_prob", "diverging", "num_steps", "tree_depth"}``,
        each Tensor[C].
    """
    r0 = sample_momentum(point.z, inv_mass)
    current = PhasePoint(point.z, r0, point.potential, point.grad)
    energy0 = point.potential + kinetic_energy(r0, inv_mass)
    builder = _TreeBuilder(potential_and_grad, inv_mass, energy0, point.z)
    minus, plus = current, current
    proposal = current
    log_weight = torch.zeros_like(energy0)
    r_sum = r0
    active = torch.ones_like(energy0, dtype=torch.bool)
    all_active = True
    diverging = torch.zeros_like(active)
    sum_accept = torch.zeros_like(energy0)
    num_steps = torch.zeros_like(energy0)
    tree_depth = torch.zeros_like(energy0)
    for depth in range(max_tree_depth):
        forward = torch.rand_like(energy0) < 0.5
        direction = torch.where(forward, 1.0, -1.0).to(energy0.dtype)
        start = plus.where(forward, minus)
        sub = builder.build(start, step_size * direction, depth, active, all_active)
        sum_accept = sum_accept + torch.where(active, sub.sum_accept, torch.zeros_like(sub.sum_accept))
        num_steps = num_steps + torch.where(active, sub.num_steps, torch.zeros_like(sub.num_steps))
        tree_depth = tree_depth + active.to(tree_depth.dtype)
        diverging = diverging | (active & sub.diverging)
        valid = active & ~sub.turning & ~sub.diverging
        # Biased progressive sampling between the old tree and the new subtree (Betancourt 2017, A.3.2).
        take = valid & (torch.rand_like(log_weight).log() < sub.log_weight - log_weight)
        proposal = sub.proposal.where(take, proposal)
        old_inner_r = torch.where(forward.unsqueeze(-1), minus.r, plus.r)
        old_outer_r = torch.where(forward.unsqueeze(-1), plus.r, minus.r)
        old_r_sum = r_sum
        log_weight = torch.where(valid, torch.logaddexp(log_weight, sub.log_weight), log_weight)
        plus = sub.outer.where(valid & forward, plus)
        minus = sub.outer.where(valid & ~forward, minus)
        r_sum = _pick(valid, r_sum + sub.r_sum, r_sum)
        no_turn = (
            _no_turn(inv_mass * minus.r, inv_mass * plus.r, r_sum)
            & _no_turn(inv_mass * old_inner_r, inv_mass * sub.r_inner, old_r_sum + sub.r_inner)
            & _no_turn(inv_mass * old_outer_r, inv_mass * sub.outer.r, sub.r_sum + old_outer_r)
        )
        active = valid & no_turn
        num_active = int(active.sum())
        if num_active == 0:
            break
        all_active = num_active == active.shape[0]
    info = {
        "accept_prob": sum_accept / num_steps.clamp(min=1),
        "diverging": diverging,
        "num_steps": num_steps,
        "tree_depth": tree_depth,
    }
    return PhasePoint(proposal.z, proposal.r, proposal.potential, proposal.grad), info


def hmc_step(
    point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor, potential_and_grad, num_steps: int = 10
) -> tuple[PhasePoint, dict[str, torch.Tensor]]:
    """One HMC transition of every chain: ``num_steps`` leapfrog steps and a Metropolis correction.

    Returns:
        ``(new_point, info)`` with ``info`` = ``{"accept_prob", "diverging", "num_steps"}``, each Tensor[C].
    """
    r0 = sample_momentum(point.z, inv_mass)
    current = PhasePoint(point.z, r0, point.potential, point.grad)
    energy0 = point.potential + kinetic_energy(r0, inv_mass)
    new = current
    diverging = torch.zeros_like(energy0, dtype=torch.bool)
    for _ in range(num_steps):
        new = leapfrog(new, step_size, inv_mass, potential_and_grad, ~diverging, point.z)
        delta = torch.nan_to_num(new.potential + kinetic_energy(new.r, inv_mass) - energy0, nan=math.inf)
        diverging = diverging | (delta > MAX_ENERGY_ERROR)
    delta = torch.nan_to_num(new.potential + kinetic_energy(new.r, inv_mass) - energy0, nan=math.inf)
    accept_prob = torch.where(diverging, torch.zeros_like(delta), torch.clamp(torch.exp(-delta), max=1.0))
    accept = torch.rand_like(accept_prob) < accept_prob
    info = {
        "accept_prob": accept_prob,
        "diverging": diverging,
        "num_steps": torch.full_like(energy0, float(num_steps)),
    }
    return new.where(accept, current), info
