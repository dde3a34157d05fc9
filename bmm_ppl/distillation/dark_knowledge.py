"""Bayesian Dark Knowledge (Korattikara, Rathod, Murphy & Welling, 2015): online posterior distillation.

Each step takes one stochastic-gradient Langevin (SGLD) step on the teacher's weights θ, targeting
``p(θ | data) ∝ N(θ; 0, prior_scale² I) · Π_i p(y_i | x_i, θ)``, and one gradient step on the student on
inputs perturbed around the training data, with the current teacher sample's predictive as the target.
Averaged over the chain, the student fits the posterior predictive ``E_θ[p(y | x, θ)]`` without ever
storing the teacher's samples.

The teacher's update is the SG-MCMC engine's kernel,
:func:`~bmm_ppl.inference.sgmcmc.kernels.sgld_update` (Welling & Teh 2011), in the engine's convention:
``θ ← θ − ε ∇Û + √(2ε) ξ`` with ``Û = −log p(θ) − (N/B) Σ_{i∈batch} log p(y_i | x_i, θ)`` and
``ξ ∼ N(0, I)``. (Before this convention was shared, Bayesian Dark Knowledge wrote the step as
``θ + (ε/2) ĝ + √ε ξ``: an old ``step_size`` of ε is a new one of ε/2.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from bmm_ppl.distillation.student import GaussianPerturbation, check_student_output
from bmm_ppl.distillation.losses import unchecked_gaussian_distillation_loss
from bmm_ppl.distillation.teachers import Task, regression_output
from bmm_ppl.inference.errors import DivergenceError
from bmm_ppl.inference.sgmcmc.kernels import sgld_update
from bmm_ppl.validation import check_same_length, check_tensor


@dataclass
class DarkKnowledgeResult:
    """What :meth:`BayesianDarkKnowledge.fit` returns.

    Attributes:
        student: the trained student.
        teacher: the teacher module holding the last SGLD sample.
        teacher_samples: thinned teacher ``state_dict`` copies when ``store_every`` was set (for evaluation
            only; Bayesian Dark Knowledge itself needs none), else an empty list.
        student_loss_trace: Tensor[num_steps] the student's distillation loss per step.
        teacher_log_likelihood_trace: Tensor[num_steps] mean minibatch log-likelihood of the teacher.
    """

    student: torch.nn.Module
    teacher: torch.nn.Module
    teacher_samples: list
    student_loss_trace: torch.Tensor
    teacher_log_likelihood_trace: torch.Tensor
    diagnostics: dict = field(default_factory=dict)

    def teacher_ensemble(self) -> list[torch.nn.Module]:
        """The stored teacher samples as modules (a list, which :func:`distill` accepts as an ensemble)."""
        members = []
        for state in self.teacher_samples:
            member = copy.deepcopy(self.teacher)
            member.load_state_dict(state)
            members.append(member.eval())
        return members


class BayesianDarkKnowledge:
    """Online distillation of an SGLD posterior over ``teacher``'s weights into ``student``.

    Args:
        teacher: ``nn.Module``; its parameters are the SGLD state (initial values: the module's). Outputs
            logits Tensor[n, K] (classification), or Tensor[n] / [n, 1] means with Gaussian noise
            ``noise_scale``, or Tensor[n, 2] mean and log-variance (regression).
        student: ``nn.Module`` with logits Tensor[n, K] (classification) or Tensor[n, 2] mean and
            log-variance (regression).
        task: ``"classification"`` or ``"regression"``.
        prior_scale: standard deviation of the Gaussian prior on every teacher weight.
        noise_scale: observation noise standard deviation for a mean-only regression teacher.
        step_size: SGLD step size ε (constant), in the SG-MCMC engine's convention
            ``θ − ε ∇U + √(2ε) ξ`` (:func:`~bmm_ppl.inference.sgmcmc.kernels.sgld_update`, the kernel used).
        lr: the student's Adam learning rate, decayed geometrically to ``lr · lr_final_fraction`` at the
            last step (the student then averages over more teacher samples, as in Korattikara et al.).
        lr_final_fraction: see ``lr``.
        num_steps: SGLD steps (each followed by a student step after ``burn_in``).
        burn_in: SGLD steps before the student starts learning.
        batch_size: teacher minibatch size B; the student's batches have the same size.
        perturbation: the student's inputs are ``x + perturbation · sd(x) · ε`` (see
            :class:`~bmm_ppl.distillation.GaussianPerturbation`); 0 uses the training inputs themselves.
        store_every: keep a copy of every ``store_every``-th teacher sample after burn-in (evaluation only).
        check_every: how often (in steps) to check that the teacher has not diverged (one sync each).
        progress: show a tqdm bar.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
        >>> bdk = BayesianDarkKnowledge(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), num_steps=50, burn_in=10, progress=False)
        >>> result = bdk.fit(x, y)
        >>> result.student_loss_trace.shape
        torch.Size([50])
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        *,
        task: str | Task = Task.CLASSIFICATION,
        prior_scale: float = 1.0,
        noise_scale: float | None = None,
        step_size: float = 5e-5,
        lr: float = 1e-3,
        lr_final_fraction: float = 0.01,
        num_steps: int = 1000,
        burn_in: int = 100,
        batch_size: int = 100,
        perturbation: float = 0.1,
        store_every: int | None = None,
        check_every: int = 100,
        progress: bool = True,
    ):
        for name, module in (("teacher", teacher), ("student", student)):
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
        for name, value in (("prior_scale", prior_scale), ("step_size", step_size), ("lr", lr)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_steps < 1 or batch_size < 1 or burn_in < 0 or burn_in >= num_steps:
            raise ValueError(f"need num_steps >= 1, batch_size >= 1 and 0 <= burn_in < num_steps, got {num_steps}, {batch_size}, {burn_in}")
        self.teacher, self.student = teacher, student
        self.task = Task.parse(task, "task")
        self.prior_scale, self.noise_scale = float(prior_scale), noise_scale
        if not 0 < lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction must lie in (0, 1], got {lr_final_fraction}")
        self.step_size, self.lr, self.lr_final_fraction = float(step_size), float(lr), float(lr_final_fraction)
        self.num_steps, self.burn_in, self.batch_size = int(num_steps), int(burn_in), int(batch_size)
        self.perturbation, self.store_every, self.check_every = float(perturbation), store_every, int(check_every)
        self.progress = progress

    # ------------------------------------------------------------ likelihood
    def _log_likelihood(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_i log p(y_i | x_i, θ) over a batch."""
        if self.task is Task.CLASSIFICATION:
            return -torch.nn.functional.cross_entropy(output, y, reduction="sum")
        mean, log_var = self._teacher_gaussian(output)
        return (-0.5 * (log_var + (y - mean).pow(2) * torch.exp(-log_var) + torch.log(2 * torch.pi * torch.ones_like(mean)))).sum()

    def _teacher_gaussian(self, output):
        if output.dim() == 2 and output.shape[1] == 2:
            return output[:, 0], output[:, 1]
        mean, _ = regression_output(output, "teacher output")
        return mean, torch.full_like(mean, 2.0 * math.log(self.noise_scale))

    def _student_loss(self, student_out, teacher_out):
        if self.task is Task.CLASSIFICATION:
            log_q = torch.log_softmax(student_out, -1)
            return -(torch.softmax(teacher_out, -1) * log_q).sum(-1).mean()
        mean, log_var = self._teacher_gaussian(teacher_out)
        return unchecked_gaussian_distillation_loss(student_out[:, 0], student_out[:, 1], mean, log_var.exp())

    # ------------------------------------------------------------------- fit
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> DarkKnowledgeResult:
        """Runs SGLD on the teacher and distils it into the student at the same time.

        Args:
            x: Tensor[N, ...] training inputs. y: Tensor[N] labels (integers) or targets (floats).

        Returns:
            :class:`DarkKnowledgeResult`.
        """
        check_tensor("x", x)
        check_tensor("y", y, dim=1)
        n = check_same_length(x=x, y=y)
        device = next(iter(self.student.parameters())).device
        for name, tensor in (("x", x), ("y", y)):
            if tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but the student is on {device}; move one of them")
        teacher_params = [p for p in self.teacher.parameters()]
        if not teacher_params or teacher_params[0].device != device:
            raise ValueError("teacher must have parameters on the student's device")
        if self.task is Task.CLASSIFICATION and y.is_floating_point():
            raise ValueError(f"classification needs integer labels y, got {y.dtype}")
        if self.task is Task.REGRESSION:
            if not y.is_floating_point():
                raise ValueError(f"regression needs float targets y, got {y.dtype}")
            probe = self.teacher(x[:2])
            if not (probe.dim() == 2 and probe.shape[1] == 2) and self.noise_scale is None:
                raise ValueError("a mean-only regression teacher needs noise_scale (the observation noise sd)")
        with torch.no_grad():
            probe_t, probe_s = self.teacher(x[:2]), self.student(x[:2])
        num_classes = probe_t.shape[1] if self.task is Task.CLASSIFICATION else None
        check_student_output(probe_s, self.task, num_classes, 2)

        batch = min(self.batch_size, n)
        source = GaussianPerturbation(x, scale=self.perturbation)
        optim = torch.optim.Adam(self.student.parameters(), lr=self.lr)
        decay = self.lr_final_fraction ** (1.0 / max(self.num_steps - self.burn_in - 1, 1))
        prior_precision = 1.0 / self.prior_scale**2
        student_losses = torch.zeros(self.num_steps, device=device, dtype=probe_s.dtype)
        log_liks = torch.zeros(self.num_steps, device=device, dtype=probe_s.dtype)
        stored = []
        self.student.train()
        for step in tqdm(range(self.num_steps), disable=not self.progress, desc="dark knowledge"):
            # Teacher: one SGLD step on the minibatch estimate of the log posterior.
            rows = torch.randint(0, n, (batch,), device=device)
            log_lik = self._log_likelihood(self.teacher(x[rows]), y[rows])
            grads = torch.autograd.grad(log_lik, teacher_params)
            scale = n / batch
            with torch.no_grad():
                for p, g in zip(teacher_params, grads):
                    # dU/dθ of U = -log prior - (N/B) log-likelihood of the batch.
                    potential_grad = torch.add(g, p, alpha=-prior_precision / scale).mul_(-scale)
                    moved, _ = sgld_update(p, potential_grad, {}, step_size=self.step_size)
                    p.copy_(moved)
            log_liks[step] = log_lik.detach() / batch
            if step >= self.burn_in:
                # Student: one step towards this teacher sample's predictive at perturbed inputs.
                inputs = source.sample(batch) if self.perturbation > 0 else x[torch.randint(0, n, (batch,), device=device)]
                with torch.no_grad():
                    target = self.teacher(inputs)
                loss = self._student_loss(self.student(inputs), target)
                optim.zero_grad()
                loss.backward()
                with torch.device(device):  # keeps the optimiser's step counters with the student
                    optim.step()
                for group in optim.param_groups:
                    group["lr"] *= decay
                student_losses[step] = loss.detach()
                if self.store_every and (step - self.burn_in) % self.store_every == 0:
                    stored.append({k: v.detach().clone() for k, v in self.teacher.state_dict().items()})
            if (step + 1) % self.check_every == 0 or step + 1 == self.num_steps:
                finite = torch.stack([torch.isfinite(p).all() for p in teacher_params] + [torch.isfinite(student_losses[step])]).all()
                if not bool(finite):
                    raise DivergenceError(f"SGLD teacher or student diverged by step {step + 1}; lower step_size (now {self.step_size})")
        return DarkKnowledgeResult(
            student=self.student,
            teacher=self.teacher,
            teacher_samples=stored,
            student_loss_trace=student_losses,
            teacher_log_likelihood_trace=log_liks,
            diagnostics={"step_size": self.step_size, "num_data": n, "burn_in": self.burn_in},
        )
