"""The No-U-Turn transition over a batch of chains, built leaf by leaf (iteratively) with checkpoints.

Each transition draws a momentum and doubles the trajectory forwards or backwards in time until it
makes a U-turn, diverges, or reaches ``max_tree_depth`` doublings; the next state is drawn from the
trajectory's points with multinomial weights ``exp(-H)`` (Betancourt 2017): uniformly-progressive
within each new subtree, biased-progressive when a subtree is merged into the trajectory.

Each new subtree of ``2**depth`` leapfrog steps is built one leaf at a time, as in the iterative form of
NUTS (NumPyro's ``iterative_nuts``; Phan et al. 2019): the momentum and running momentum sum of the
leaves that open a sub-subtree are kept in ``max_tree_depth`` checkpoints, and each leaf that closes
sub-subtrees checks the generalised no-U-turn criterion on each of them. Even leaves only open, odd
leaves only close, so each pair of leaves runs the same fixed sequence of tensor operations, which
:class:`NUTSKernel` captures, potential and gradient included, as one graph (``jit=True``): one call and
one host synchronisation per two leapfrog steps. (Stan's extra checks across merged subtrees are not
applied: they would have to be applied at every node of the tree to keep it symmetric.)

Chains advance in lockstep: a chain whose subtree stops early (U-turn or divergence) is masked (its
statistics stop counting; its integration goes on unseen, rows of the batched potential being
independent) while the others go on. Shapes: ``C`` chains, ``D`` dimensions,
``K = max_tree_depth`` checkpoints; the inverse mass matrix ``inv_mass`` is diagonal (``Tensor[C, D]``) or
dense (``Tensor[C, D, D]``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

from bmm_ppl.inference.hmc.integrator import PhasePoint, is_dense, kinetic_energy, sample_momentum, velocity

MAX_ENERGY_ERROR = 1000.0  # Stan's threshold on H(new) - H(start) for calling a transition divergent


class NUTSInfo(NamedTuple):
    """What one NUTS transition reports per chain (every field ``Tensor[C]``, ArviZ's sample-stat names)."""

    acceptance_rate: torch.Tensor  # mean over the trajectory's leapfrog steps of min(1, exp(H0 - H))
    diverging: torch.Tensor  # bool: the energy error passed MAX_ENERGY_ERROR
    energy: torch.Tensor  # the Hamiltonian at the drawn point (its own momentum), for BFMI
    n_steps: torch.Tensor  # leapfrog steps taken
    tree_depth: torch.Tensor  # doublings taken


class Trajectory(NamedTuple):
    """The trajectory built so far in one transition (every field per chain)."""

    minus_z: torch.Tensor  # Tensor[C, D]: the backward end ...
    minus_r: torch.Tensor
    minus_grad: torch.Tensor
    minus_potential: torch.Tensor  # Tensor[C]
    plus_z: torch.Tensor  # ... and the forward end
    plus_r: torch.Tensor
    plus_grad: torch.Tensor
    plus_potential: torch.Tensor
    proposal_z: torch.Tensor  # the multinomially sampled point
    proposal_potential: torch.Tensor
    proposal_grad: torch.Tensor
    proposal_delta: torch.Tensor  # Tensor[C]: H(proposal) - H0, for the energy at the draw
    log_weight: torch.Tensor  # Tensor[C]: log sum over points of exp(H0 - H)
    r_sum: torch.Tensor  # Tensor[C, D]: sum of the points' momenta
    active: torch.Tensor  # Tensor[C] bool: still doubling
    diverging: torch.Tensor  # Tensor[C] bool
    sum_accept: torch.Tensor  # Tensor[C]: sum over leapfrog steps of min(1, exp(H0 - H))
    num_steps: torch.Tensor  # Tensor[C]: leapfrog steps taken
    tree_depth: torch.Tensor  # Tensor[C]: doublings taken


class Subtree(NamedTuple):
    """The subtree under construction: its last leaf, proposal, weight and U-turn checkpoints."""

    z: torch.Tensor  # Tensor[C, D]: the last leaf
    r: torch.Tensor
    grad: torch.Tensor
    potential: torch.Tensor  # Tensor[C]
    proposal_z: torch.Tensor
    proposal_potential: torch.Tensor
    proposal_grad: torch.Tensor
    proposal_delta: torch.Tensor  # Tensor[C]: H(proposal) - H0
    log_weight: torch.Tensor  # Tensor[C]
    r_sum: torch.Tensor  # Tensor[C, D]
    r_checkpoints: torch.Tensor  # Tensor[C, K, D]: momentum of the leaf opening each open sub-subtree
    r_sum_checkpoints: torch.Tensor  # Tensor[C, K, D]: the running momentum sum at that leaf
    building: torch.Tensor  # Tensor[C] bool: neither turned nor diverged yet, and the chain is active
    turning: torch.Tensor  # Tensor[C] bool
    diverging: torch.Tensor  # Tensor[C] bool
    sum_accept: torch.Tensor  # Tensor[C]
    num_steps: torch.Tensor  # Tensor[C]
    forward: torch.Tensor  # Tensor[C] bool: the direction of this doubling
    half_step: torch.Tensor  # Tensor[C, 1]: half the signed step size
    step_inv_mass: torch.Tensor  # Tensor[C, D] (or [C, D, D]): signed step size times the inverse mass
    any_building: torch.Tensor  # Tensor[] bool: whether any chain still builds (read once per leaf)


def _col(mask: torch.Tensor) -> torch.Tensor:
    return mask.unsqueeze(-1)


def _no_turn(v_begin: torch.Tensor, v_end: torch.Tensor, r_sum: torch.Tensor) -> torch.Tensor:
    """Generalised no-U-turn criterion over the last dimension (Betancourt 2017): True while not turning."""
    return ((v_begin * r_sum).sum(-1) > 0) & ((v_end * r_sum).sum(-1) > 0)


def begin_doubling(tree: Trajectory, step_size: torch.Tensor, inv_mass: torch.Tensor, num_checkpoints: int) -> Subtree:
    """Draws each chain's direction and opens an empty subtree at that end of the trajectory."""
    forward = torch.rand_like(step_size) < 0.5
    col = _col(forward)
    z = torch.where(col, tree.plus_z, tree.minus_z)
    potential = torch.where(forward, tree.plus_potential, tree.minus_potential)
    grad = torch.where(col, tree.plus_grad, tree.minus_grad)
    checkpoints = z.new_zeros(z.shape[:1] + (num_checkpoints,) + z.shape[1:])
    step = _col(torch.where(forward, step_size, -step_size))
    step_inv_mass = (step.unsqueeze(-1) if is_dense(inv_mass) else step) * inv_mass
    return Subtree(
        z=z, r=torch.where(col, tree.plus_r, tree.minus_r), grad=grad, potential=potential,
        proposal_z=z, proposal_potential=potential, proposal_grad=grad, proposal_delta=torch.zeros_like(step_size),
        log_weight=torch.full_like(step_size, -math.inf), r_sum=torch.zeros_like(z),
        r_checkpoints=checkpoints, r_sum_checkpoints=checkpoints,
        building=tree.active, turning=torch.zeros_like(tree.active), diverging=torch.zeros_like(tree.active),
        sum_accept=torch.zeros_like(step_size), num_steps=torch.zeros_like(step_size),
        forward=forward, half_step=0.5 * step, step_inv_mass=step_inv_mass, any_building=tree.active.any(),
    )


def add_leaf(potential_and_grad, sub: Subtree, half_inv_mass: torch.Tensor, inv_mass: torch.Tensor,
             energy0: torch.Tensor, mask: torch.Tensor, opens: bool) -> Subtree:
    """One leapfrog step of every building chain, added to its subtree. A leaf with an even index
    within its subtree opens sub-subtrees (``opens=True``: stores its checkpoint); one with an odd index
    closes them (``opens=False``: checks them for U-turns).

    Args:
        potential_and_grad: ``z: Tensor[C, D] -> (U: Tensor[C], dU/dz: Tensor[C, D])``.
        half_inv_mass: half the inverse mass (``Tensor[C, D]`` or ``[C, D, D]``).
        inv_mass: the inverse mass (``Tensor[C, D]`` or ``[C, D, D]``).
        energy0: Tensor[C] the Hamiltonian at the transition's start.
        mask: with ``opens``, Tensor[K, 1] bool: the checkpoint this leaf opens; else Tensor[K] bool: the
            checkpoints whose sub-subtrees this leaf closes (see :func:`_checkpoint_masks`).
    """
    # Only the statistics (acceptance, step count, divergence) and the building flag are masked: the
    # rest of a chain's subtree state is never read once it stops building (its subtree is not merged),
    # and the rows of the batched potential are independent, so a stopped chain may go on integrating.
    building = sub.building
    r_half = torch.addcmul(sub.r, sub.half_step, sub.grad, value=-1.0)
    if is_dense(sub.step_inv_mass):
        z_new = sub.z + velocity(r_half, sub.step_inv_mass)
    else:
        z_new = torch.addcmul(sub.z, sub.step_inv_mass, r_half)
    potential, grad = potential_and_grad(z_new)
    r_new = torch.addcmul(r_half, sub.half_step, grad, value=-1.0)
    delta = potential - energy0 + (r_new * velocity(r_new, half_inv_mass)).sum(-1)  # H(new) - H(start)
    delta = torch.nan_to_num(delta, nan=math.inf, posinf=math.inf, neginf=math.inf)
    log_weight = -delta
    diverging = building & (delta > MAX_ENERGY_ERROR)
    accept = torch.exp(log_weight).clamp(max=1.0) * building
    # Progressive multinomial sampling within the subtree: the new leaf replaces the proposal with
    # probability w_leaf / (w_subtree + w_leaf).
    merged_weight = torch.logaddexp(sub.log_weight, log_weight)
    take = torch.rand_like(delta) < torch.exp(log_weight - merged_weight)
    take_col = _col(take)
    r_sum = sub.r_sum + r_new
    r_new_k, r_sum_k = r_new.unsqueeze(1), r_sum.unsqueeze(1)
    r_checkpoints, r_sum_checkpoints, turning = sub.r_checkpoints, sub.r_sum_checkpoints, sub.turning
    if opens:
        r_checkpoints = torch.where(mask, r_new_k, r_checkpoints)
        r_sum_checkpoints = torch.where(mask, r_sum_k, r_sum_checkpoints)
        still_building = building > diverging
    else:
        # Sub-subtree from checkpoint k to this leaf: momentum sum rho = r_sum - r_sum[k] + r[k]; the
        # criterion v . rho > 0 at both ends with v = M^-1 r, i.e. r . (M^-1 rho) > 0.
        velocity_rho = velocity(r_sum_k - r_sum_checkpoints + r_checkpoints, inv_mass)  # (C, K, D)
        not_turning = ((r_checkpoints * velocity_rho).sum(-1) > 0) & ((r_new_k * velocity_rho).sum(-1) > 0)
        turned = (mask > not_turning).any(-1)  # a checked sub-subtree that turns
        still_building = building > (turned | diverging)
        turning = turning | turned
    return Subtree(
        z=z_new, r=r_new, grad=grad, potential=potential,
        proposal_z=torch.where(take_col, z_new, sub.proposal_z),
        proposal_potential=torch.where(take, potential, sub.proposal_potential),
        proposal_grad=torch.where(take_col, grad, sub.proposal_grad),
        proposal_delta=torch.where(take, delta, sub.proposal_delta),
        log_weight=merged_weight, r_sum=r_sum,
        r_checkpoints=r_checkpoints, r_sum_checkpoints=r_sum_checkpoints,
        building=still_building, turning=turning, diverging=sub.diverging | diverging,
        sum_accept=sub.sum_accept + accept, num_steps=sub.num_steps + building,
        forward=sub.forward, half_step=sub.half_step, step_inv_mass=sub.step_inv_mass,
        any_building=still_building.any(),
    )


def add_leaf_pair(potential_and_grad, sub: Subtree, half_inv_mass: torch.Tensor, inv_mass: torch.Tensor,
                  energy0: torch.Tensor, store: torch.Tensor, check: torch.Tensor) -> Subtree:
    """Leaves ``n`` (even: ``store``) and ``n + 1`` (odd: ``check``) in one go: one graph call and one host
    synchronisation per pair. A chain that stops at the first leaf is masked in the second."""
    sub = add_leaf(potential_and_grad, sub, half_inv_mass, inv_mass, energy0, store, opens=True)
    return add_leaf(potential_and_grad, sub, half_inv_mass, inv_mass, energy0, check, opens=False)


def merge_subtree(tree: Trajectory, sub: Subtree, inv_mass: torch.Tensor) -> Trajectory:
    """Joins a finished subtree to the trajectory (biased-progressive sampling, Betancourt 2017 A.3.2)
    unless it turned or diverged, and checks the whole trajectory for a U-turn."""
    was_active = tree.active
    valid = was_active & ~sub.turning & ~sub.diverging
    take = valid & (torch.rand_like(tree.log_weight).log() < sub.log_weight - tree.log_weight)
    take_col = _col(take)
    forward = valid & sub.forward
    backward = valid & ~sub.forward
    forward_col, backward_col = _col(forward), _col(backward)
    minus_r = torch.where(backward_col, sub.r, tree.minus_r)
    plus_r = torch.where(forward_col, sub.r, tree.plus_r)
    r_sum = torch.where(_col(valid), tree.r_sum + sub.r_sum, tree.r_sum)
    no_turn = _no_turn(velocity(minus_r, inv_mass), velocity(plus_r, inv_mass), r_sum)
    return Trajectory(
        minus_z=torch.where(backward_col, sub.z, tree.minus_z), minus_r=minus_r,
        minus_grad=torch.where(backward_col, sub.grad, tree.minus_grad),
        minus_potential=torch.where(backward, sub.potential, tree.minus_potential),
        plus_z=torch.where(forward_col, sub.z, tree.plus_z), plus_r=plus_r,
        plus_grad=torch.where(forward_col, sub.grad, tree.plus_grad),
        plus_potential=torch.where(forward, sub.potential, tree.plus_potential),
        proposal_z=torch.where(take_col, sub.proposal_z, tree.proposal_z),
        proposal_potential=torch.where(take, sub.proposal_potential, tree.proposal_potential),
        proposal_grad=torch.where(take_col, sub.proposal_grad, tree.proposal_grad),
        proposal_delta=torch.where(take, sub.proposal_delta, tree.proposal_delta),
        log_weight=torch.where(valid, torch.logaddexp(tree.log_weight, sub.log_weight), tree.log_weight),
        r_sum=r_sum, active=valid & no_turn, diverging=tree.diverging | sub.diverging,
        sum_accept=tree.sum_accept + sub.sum_accept, num_steps=tree.num_steps + sub.num_steps,
        tree_depth=tree.tree_depth + was_active.to(tree.tree_depth.dtype),
    )


def merge_and_open(tree: Trajectory, sub: Subtree, step_size: torch.Tensor, inv_mass: torch.Tensor,
                   num_checkpoints: int) -> tuple[Trajectory, Subtree]:
    """:func:`merge_subtree`, then :func:`begin_doubling` of the next subtree (one graph per doubling)."""
    tree = merge_subtree(tree, sub, inv_mass)
    return tree, begin_doubling(tree, step_size, inv_mass, num_checkpoints)


def start_trajectory(point: PhasePoint, inv_mass: torch.Tensor) -> tuple[Trajectory, torch.Tensor]:
    """A fresh momentum per chain and the one-point trajectory at ``point``; returns it and ``H0: Tensor[C]``."""
    r0 = sample_momentum(point.z, inv_mass)
    energy0 = point.potential + kinetic_energy(r0, inv_mass)
    zeros = torch.zeros_like(energy0)
    active = torch.ones_like(energy0, dtype=torch.bool)
    tree = Trajectory(
        point.z, r0, point.grad, point.potential, point.z, r0, point.grad, point.potential,
        point.z, point.potential, point.grad, zeros, zeros, r0, active, ~active, zeros, zeros, zeros,
    )
    return tree, energy0


def _checkpoint_masks(leaf: int, num_checkpoints: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For leaf ``n`` of a subtree: the checkpoint it opens (even ``n``: the number of set bits of
    ``n >> 1``; Tensor[K, 1] bool) and the checkpoints whose sub-subtrees it closes (odd ``n``: as many as
    its trailing ones, counting down from that index; Tensor[K] bool)."""
    store = torch.zeros(num_checkpoints, dtype=torch.bool, device=device)
    check = torch.zeros(num_checkpoints, dtype=torch.bool, device=device)
    top = bin(leaf >> 1).count("1")
    if leaf % 2 == 0:
        store[top] = True
    else:
        trailing_ones = len(bin(leaf)) - len(bin(leaf).rstrip("1"))
        check[top - trailing_ones + 1: top + 1] = True
    return store.unsqueeze(-1), check


class NUTSKernel:
    """Multinomial NUTS transitions of a batch of chains over one potential.

    Args:
        potential_and_grad: ``z: Tensor[C, D] -> (U: Tensor[C], dU/dz: Tensor[C, D])`` (eager).
        max_tree_depth: at most ``max_tree_depth`` doublings, ``2**max_tree_depth - 1`` leapfrog steps.
        functional_potential_and_grad: the same function written with ``torch.func`` transforms (no
            ``torch.autograd.grad``), which :meth:`compile` records into the leaf graph; ``None`` to use
            ``potential_and_grad`` as the compiled potential.

    Examples:
        >>> def potential_and_grad(z):
        ...     return 0.5 * (z * z).sum(-1), z
        >>> kernel = NUTSKernel(potential_and_grad, max_tree_depth=5)
        >>> z = torch.zeros(2, 3)
        >>> point = PhasePoint(z, z, *potential_and_grad(z))
        >>> new, info = kernel.step(point, torch.full((2,), 0.5), torch.ones(2, 3))
        >>> new.z.shape, info._fields
        (torch.Size([2, 3]), ('acceptance_rate', 'diverging', 'energy', 'n_steps', 'tree_depth'))
    """

    def __init__(self, potential_and_grad: Callable, max_tree_depth: int = 10,
                 functional_potential_and_grad: Callable | None = None):
        self.potential_and_grad = potential_and_grad
        self.functional_potential_and_grad = functional_potential_and_grad or potential_and_grad
        self.max_tree_depth = max_tree_depth
        self._open = functools.partial(_open_flat, max_tree_depth)
        self._leaf = functools.partial(_leaf_flat, potential_and_grad)
        self._pair = functools.partial(_pair_flat, potential_and_grad)
        self._merge_and_open = functools.partial(_merge_and_open_flat, max_tree_depth)
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled = False

    def _leaf_masks(self, leaf: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if leaf not in self._masks:
            self._masks[leaf] = _checkpoint_masks(leaf, self.max_tree_depth, device)
        return self._masks[leaf]

    def compile(self, point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor) -> bool:
        """Captures the pieces of a transition (open the first subtree, add one leaf, add a pair of
        leaves, merge a subtree and open the next) as graphs for inputs shaped like these, and keeps them if they reproduce the
        eager pieces on a random probe (same random numbers); returns whether they were kept."""
        from bmm_ppl.inference.program.graph_capture import capture

        device = point.z.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            tree, energy0 = start_trajectory(point, inv_mass)
            sub = begin_doubling(tree, step_size, inv_mass, self.max_tree_depth)
            store, check = self._leaf_masks(0, device)[0], self._leaf_masks(1, device)[1]
            functional = self.functional_potential_and_grad
            constants = (0.5 * inv_mass, inv_mass, energy0)
            pieces = [
                (self._open, (*tree, step_size, inv_mass)),
                (functools.partial(_leaf_flat, functional), (*sub, *constants, store)),
                (functools.partial(_pair_flat, functional), (*sub, *constants, store, check)),
                (self._merge_and_open, (*tree, *sub, step_size, inv_mass)),
            ]
            captured = [capture(fn, args) for fn, args in pieces]
            for (fn, args), graph in zip(pieces, captured):
                torch.manual_seed(0)
                expected = fn(*args)
                torch.manual_seed(0)
                got = graph(*args)
                if not all(_same(a, b) for a, b in zip(expected, got)):
                    return False
        self._open, self._leaf, self._pair, self._merge_and_open = captured
        self.compiled = True
        return True

    def step(self, point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor):
        """One transition of every chain.

        Args:
            point: the current positions (``point.r`` is ignored: momenta are drawn afresh).
            step_size: Tensor[C].
            inv_mass: the inverse mass matrices, diagonal ``Tensor[C, D]`` or dense ``Tensor[C, D, D]``.

        Returns:
            ``(new_point, info)`` with ``info`` a :class:`NUTSInfo`.
        """
        tree, energy0 = start_trajectory(point, inv_mass)
        half_inv_mass = 0.5 * inv_mass
        device = point.z.device
        sub = self._open(*tree, step_size, inv_mass)
        for depth in range(self.max_tree_depth):
            if depth == 0:  # a one-leaf subtree
                sub = self._leaf(*sub, half_inv_mass, inv_mass, energy0, self._leaf_masks(0, device)[0])
            for leaf in range(0, 2**depth if depth else 0, 2):
                store, check = self._leaf_masks(leaf, device)[0], self._leaf_masks(leaf + 1, device)[1]
                sub = self._pair(*sub, half_inv_mass, inv_mass, energy0, store, check)
                if not bool(sub[-1]):  # Subtree.any_building: every chain has stopped this subtree
                    break
            merged = self._merge_and_open(*tree, *sub, step_size, inv_mass)
            tree, sub = Trajectory(*merged[:_TREE_FIELDS]), merged[_TREE_FIELDS:]
            if not bool(sub[-1]):  # the next subtree's any_building: no chain is still doubling
                break
        info = NUTSInfo(
            acceptance_rate=tree.sum_accept / tree.num_steps.clamp(min=1),
            diverging=tree.diverging,
            energy=energy0 + tree.proposal_delta,
            n_steps=tree.num_steps,
            tree_depth=tree.tree_depth,
        )
        return PhasePoint(tree.proposal_z, tree.minus_r, tree.proposal_potential, tree.proposal_grad), info


_TREE_FIELDS = len(Trajectory._fields)
_SUBTREE_FIELDS = len(Subtree._fields)


def _open_flat(num_checkpoints, *args):
    tree = Trajectory(*args[:_TREE_FIELDS])
    return tuple(begin_doubling(tree, args[_TREE_FIELDS], args[_TREE_FIELDS + 1], num_checkpoints))


def _leaf_flat(potential_and_grad, *args):
    return tuple(add_leaf(potential_and_grad, Subtree(*args[:_SUBTREE_FIELDS]), *args[_SUBTREE_FIELDS:], opens=True))


def _pair_flat(potential_and_grad, *args):
    return tuple(add_leaf_pair(potential_and_grad, Subtree(*args[:_SUBTREE_FIELDS]), *args[_SUBTREE_FIELDS:]))


def _merge_and_open_flat(num_checkpoints, *args):
    tree = Trajectory(*args[:_TREE_FIELDS])
    sub = Subtree(*args[_TREE_FIELDS: _TREE_FIELDS + _SUBTREE_FIELDS])
    step_size, inv_mass = args[_TREE_FIELDS + _SUBTREE_FIELDS:]
    tree, sub = merge_and_open(tree, sub, step_size, inv_mass, num_checkpoints)
    return (*tree, *sub)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.bool:
        return bool(torch.equal(a, b))
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))


def nuts_step(point: PhasePoint, step_size: torch.Tensor, inv_mass: torch.Tensor, potential_and_grad,
              max_tree_depth: int = 10) -> tuple[PhasePoint, NUTSInfo]:
    """One NUTS transition of every chain, eagerly (see :class:`NUTSKernel` for the arguments)."""
    return NUTSKernel(potential_and_grad, max_tree_depth).step(point, step_size, inv_mass)
