"""A continuous-time linear state-space layer ``dx/dt = A x + B u``, ``y = C x + D u`` (S4-style).

Discretised with step ``dt`` by zero-order hold (exact for piecewise-constant inputs) or the bilinear
(Tustin) transform, it runs either as a recurrence (``x_k = Ab x_{k-1} + Bb u_k``, ``y_k = C x_k + D u_k``,
``x_{-1} = 0``) or, for long sequences, as a causal convolution of the inputs with the kernel
``K_i = C Ab^i Bb`` computed by FFT. :meth:`ContinuousTimeSSM.state_space_model` turns the same layer into a
:class:`LinearGaussianSSM` with process and observation noise, whose exact evidence the Kalman engine computes.
"""

from __future__ import annotations

import torch
from torch import nn

from bmm_ppl._enums import StrEnum
from bmm_ppl.models.state_space.linear_gaussian import LinearGaussianSSM


class Discretisation(StrEnum):
    """How continuous-time dynamics become a step of length ``dt``."""

    ZOH = "zoh"
    BILINEAR = "bilinear"


def discretise(a: torch.Tensor, b: torch.Tensor, dt: torch.Tensor, method: str | Discretisation = "zoh"):
    """``(Ab, Bb)`` for ``dx/dt = A x + B u`` over a step ``dt``.

    ZOH: ``Ab = exp(A dt)``, ``Bb = int_0^dt exp(A s) ds B``, both read off one matrix exponential of the
    block matrix ``[[A, B], [0, 0]] dt`` (no inverse of A needed). Bilinear:
    ``Ab = (I - dt/2 A)^-1 (I + dt/2 A)``, ``Bb = (I - dt/2 A)^-1 dt B``.

    Examples:
        >>> a = -torch.ones(1, 1, dtype=torch.float64); b = torch.ones(1, 1, dtype=torch.float64)
        >>> ab, bb = discretise(a, b, torch.tensor(0.1, dtype=torch.float64))
        >>> round(float(ab), 6), round(float(bb), 6)
        (0.904837, 0.095163)
    """
    method = Discretisation.parse(method, "method")
    n, c = b.shape[-2], b.shape[-1]
    if method is Discretisation.ZOH:
        block = torch.zeros(n + c, n + c, dtype=a.dtype, device=a.device)
        block = torch.cat([torch.cat([a, b], dim=-1), block[n:]], dim=-2) * dt
        exp = torch.linalg.matrix_exp(block)
        return exp[:n, :n], exp[:n, n:]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    left = eye - 0.5 * dt * a
    return torch.linalg.solve(left, eye + 0.5 * dt * a), torch.linalg.solve(left, dt * b)


class ContinuousTimeSSM(nn.Module):
    """A learnable continuous-time linear SSM layer mapping ``u: Tensor[*batch, T, c]`` to ``Tensor[*batch, T, p]``.

    Args:
        state_dim: n, the state size.
        input_dim: c, the number of input channels.
        output_dim: p, the number of output channels.
        dt: the initial step (learned in log space).
        discretisation: ``"zoh"`` or ``"bilinear"``.
        dtype: the dtype of the parameters.
        device: the device of the parameters.

    Examples:
        >>> layer = ContinuousTimeSSM(4, 1, 1, dtype=torch.float64)
        >>> u = torch.randn(2, 50, 1, dtype=torch.float64)
        >>> torch.allclose(layer(u, mode="convolution"), layer(u, mode="recurrent"))
        True
    """

    def __init__(self, state_dim: int, input_dim: int, output_dim: int, dt: float = 0.1, discretisation: str = "zoh",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        device = torch.device("cpu") if device is None else torch.device(device)
        self.discretisation = Discretisation.parse(discretisation, "discretisation")
        gen = torch.Generator().manual_seed(0)
        # Start stable: A = -I/2 plus a small random skew part.
        skew = torch.randn(state_dim, state_dim, generator=gen, dtype=torch.float64)
        a = -0.5 * torch.eye(state_dim, dtype=torch.float64) + 0.5 * (skew - skew.T) / state_dim**0.5
        self.a = nn.Parameter(a.to(dtype=dtype, device=device))
        self.b = nn.Parameter((torch.randn(state_dim, input_dim, generator=gen, dtype=torch.float64) / state_dim**0.5).to(dtype=dtype, device=device))
        self.c = nn.Parameter((torch.randn(output_dim, state_dim, generator=gen, dtype=torch.float64) / state_dim**0.5).to(dtype=dtype, device=device))
        self.d = nn.Parameter(torch.zeros(output_dim, input_dim, dtype=dtype, device=device))
        self.log_dt = nn.Parameter(torch.tensor(float(dt), dtype=dtype, device=device).log())

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Ab, Bb)`` at the current step."""
        return discretise(self.a, self.b, self.log_dt.exp(), self.discretisation)

    def kernel(self, length: int) -> torch.Tensor:
        """``K_i = C Ab^i Bb`` for i < length: Tensor[length, p, c] (powers by repeated squaring)."""
        ab, bb = self.discrete()
        powers = torch.eye(ab.shape[-1], dtype=ab.dtype, device=ab.device).unsqueeze(0)
        step = ab
        while powers.shape[0] < length:
            powers = torch.cat([powers, step @ powers], dim=0)
            step = step @ step
        return self.c @ powers[:length] @ bb

    def forward(self, u: torch.Tensor, mode: str = "convolution") -> torch.Tensor:
        if u.dim() < 2 or u.shape[-1] != self.b.shape[-1]:
            raise ValueError(f"u must be Tensor[..., T, {self.b.shape[-1]}], got {tuple(u.shape)}")
        if mode == "recurrent":
            ab, bb = self.discrete()
            state = u.new_zeros(u.shape[:-2] + (ab.shape[-1],))
            outputs = []
            for t in range(u.shape[-2]):
                state = state @ ab.mT + u[..., t, :] @ bb.mT
                outputs.append(state @ self.c.mT)
            return torch.stack(outputs, dim=-2) + u @ self.d.mT
        if mode != "convolution":
            raise ValueError(f"mode must be 'convolution' or 'recurrent', got {mode!r}")
        length = u.shape[-2]
        size = 1 << (2 * length - 1).bit_length()
        k_f = torch.fft.rfft(self.kernel(length).permute(1, 2, 0), n=size, dim=-1)  # [p, c, F]
        u_f = torch.fft.rfft(u.mT, n=size, dim=-1)  # [*batch, c, F]
        y = torch.fft.irfft((k_f * u_f.unsqueeze(-3)).sum(-2), n=size, dim=-1)[..., :length]
        return y.mT + u @ self.d.mT

    @torch.no_grad()
    def state_space_model(self, u: torch.Tensor, transition_cov=None, observation_cov=None, initial_cov=None):
        """The layer with noise as a probabilistic model: ``(LinearGaussianSSM, controls)`` for
        ``Kalman().fit(model, y, controls)``.

        ``x_k = Ab x_{k-1} + Bb u_k + w_k``, ``y_k = C x_k + D u_k + v_k``, ``x_{-1} = 0``; the current input
        enters the transition of the previous step, so the controls stack ``[u_{k+1}, u_k]``. Noise
        covariances follow the usual convention (``None``: learned); ``initial_cov`` defaults to
        ``transition_cov`` when that is fixed, else to a learned matrix.
        """
        if u.dim() != 2:
            raise ValueError(f"u must be Tensor[T, c] here, got {tuple(u.shape)}")
        ab, bb = self.discrete()
        nxt = torch.cat([u[1:], torch.zeros_like(u[:1])], dim=0)
        controls = torch.cat([nxt, u], dim=-1)
        model = LinearGaussianSSM(
            ab.clone(), self.c.detach().clone(), transition_cov, observation_cov,
            u[0] @ bb.mT, transition_cov if initial_cov is None else initial_cov,
            control_matrix=torch.cat([bb, torch.zeros_like(bb)], dim=-1),
            observation_control_matrix=torch.cat([torch.zeros_like(self.d), self.d.detach()], dim=-1),
        )
        return model, controls
