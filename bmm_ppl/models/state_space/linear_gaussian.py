"""``LinearGaussianSSM``: a linear-Gaussian state-space model as a Pyro program.

Each matrix argument is fixed (a tensor), learned by type-II (``None``, or :func:`diagonal` for a
diagonal covariance: a ``pyro.param`` named after the argument) or given a prior (a distribution: a
``pyro.sample`` named after the argument). The program samples the whole state trajectory as one site
``"states"`` and the observations as one site ``"obs"``, so any engine can run it (SVI, NUTS with a
positive-definite ``transition_cov``); the ``Kalman`` engine instead reads :meth:`state_space_form` and
integrates the states exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import pyro
import torch
from torch.distributions import constraints

from bmm_ppl.contracts.hyperparameters import Fixed, Hyperprior, Learned
from bmm_ppl.models.state_space.distributions import GaussMarkovChain, LinearGaussianObservations
from bmm_ppl.contracts.state_space import LearnedMatrix, LinearGaussianParams, MatrixSpec, StateSpaceForm

_COVARIANCES = ("transition_cov", "observation_cov", "initial_cov")
_MATRICES = ("transition_matrix", "observation_matrix", "control_matrix", "observation_control_matrix")
ARGUMENTS = (
    "transition_matrix",
    "observation_matrix",
    "transition_cov",
    "observation_cov",
    "initial_mean",
    "initial_cov",
    "control_matrix",
    "observation_control_matrix",
)


def diagonal(init: Union[torch.Tensor, float, None] = None) -> LearnedMatrix:
    """A diagonal covariance learned by type-II; its ``pyro.param`` holds the variances, Tensor[k].

    Examples:
        >>> diagonal()
        LearnedMatrix(init=None, diagonal=True)
    """
    return LearnedMatrix(init, diagonal=True)


def _resolve(name: str, value) -> MatrixSpec:
    if isinstance(value, (Fixed, LearnedMatrix, Hyperprior)):
        spec = value
    elif isinstance(value, Learned):
        spec = LearnedMatrix(value.init)
    elif value is None:
        spec = LearnedMatrix()
    elif isinstance(value, torch.distributions.Distribution):
        spec = Hyperprior(value)
    elif isinstance(value, (torch.Tensor, int, float)):
        spec = Fixed(value if isinstance(value, torch.Tensor) else float(value))
    else:
        raise TypeError(
            f"{name} must be a tensor (fixed), None or diagonal() (learned by type-II) or a distribution "
            f"(prior), got {type(value).__name__}"
        )
    if isinstance(spec, LearnedMatrix) and spec.diagonal and name not in _COVARIANCES:
        raise ValueError(f"{name}: diagonal() is for covariances ({', '.join(_COVARIANCES)})")
    return spec


class LinearGaussianSSM:
    """A linear-Gaussian state-space model, as a Pyro program ``model(y=None, controls=None, num_steps=None)``.

    ``x_0 ~ N(initial_mean, initial_cov)`` is the state at the first observation (statsmodels /
    Durbin--Koopman, unlike Pyro's ``GaussianHMM``), ``x_{t+1} = F x_t + B u_t + L w_t`` with
    ``w_t ~ N(0, transition_cov)``, ``y_t = H x_t + D u_t + v_t`` with ``v_t ~ N(0, observation_cov)``.

    Each argument is a tensor (fixed; ``[T, ...]`` for a time-varying matrix; a number ``c`` means ``c I``
    for a covariance, ``c`` everywhere for ``initial_mean`` and the control matrices), ``None`` (learned:
    a ``pyro.param`` named after the argument, positive-definite for covariances), :func:`diagonal`
    (a learned diagonal covariance) or a distribution (a ``pyro.sample`` named after the argument; for a
    covariance it may draw a matrix, a vector of variances or one variance). Learned covariances start
    at the observations' variance, learned matrices at the identity, learned means at zero.

    Args:
        transition_matrix: F, Tensor[n, n] or Tensor[T, n, n].
        observation_matrix: H, Tensor[p, n] or Tensor[T, p, n].
        transition_cov: Q, Tensor[k, k] (k = n unless a loading is given).
        observation_cov: R, Tensor[p, p].
        initial_mean: Tensor[n].
        initial_cov: Tensor[n, n].
        control_matrix: B, Tensor[n, c], used when controls are passed (learned by default).
        observation_control_matrix: D, Tensor[p, c] (0 by default).
        transition_noise_loading: L, fixed Tensor[n, k] (identity by default).
        state_dim: n, needed only when no fixed argument shows it.

    Sites: ``"states"``: Tensor[*batch, T, n] (a :class:`GaussMarkovChain`); ``"obs"``: Tensor[*batch, T, p];
    a batch of series lives in a plate ``"series"``.

    Examples:
        >>> model = LinearGaussianSSM(torch.eye(1), torch.eye(1), None, None, torch.zeros(1), torch.eye(1))
        >>> with pyro.get_param_store().scope():  # a fresh store for this example
        ...     trace = pyro.poutine.trace(model).get_trace(torch.randn(20, 1))
        ...     learned = sorted(pyro.get_param_store().keys())
        >>> trace.nodes["states"]["value"].shape, learned
        (torch.Size([20, 1]), ['observation_cov', 'transition_cov'])
    """

    def __init__(
        self,
        transition_matrix=None,
        observation_matrix=None,
        transition_cov=None,
        observation_cov=None,
        initial_mean=None,
        initial_cov=None,
        *,
        control_matrix=None,
        observation_control_matrix=0.0,
        transition_noise_loading: torch.Tensor | None = None,
        state_dim: int | None = None,
    ):
        given = dict(
            transition_matrix=transition_matrix,
            observation_matrix=observation_matrix,
            transition_cov=transition_cov,
            observation_cov=observation_cov,
            initial_mean=initial_mean,
            initial_cov=initial_cov,
            control_matrix=control_matrix,
            observation_control_matrix=observation_control_matrix,
        )
        self.specs = {name: _resolve(name, value) for name, value in given.items()}
        self.transition_noise_loading = transition_noise_loading
        self.state_dim = self._infer_state_dim(state_dim)
        self._check_fixed()

    # ------------------------------------------------------------ structure
    def _fixed_tensor(self, name):
        spec = self.specs[name]
        return spec.value if isinstance(spec, Fixed) and isinstance(spec.value, torch.Tensor) else None

    def _infer_state_dim(self, state_dim):
        seen = {}
        for name, axis in (("transition_matrix", -1), ("initial_mean", -1), ("initial_cov", -1), ("observation_matrix", -1)):
            value = self._fixed_tensor(name)
            if value is not None and value.dim() > 0:
                seen[name] = value.shape[axis]
        if self.transition_noise_loading is not None:
            loading = self.transition_noise_loading
            if not isinstance(loading, torch.Tensor) or loading.dim() != 2:
                raise ValueError("transition_noise_loading must be a fixed Tensor[n, k]")
            seen["transition_noise_loading"] = loading.shape[0]
        elif self._fixed_tensor("transition_cov") is not None and self._fixed_tensor("transition_cov").dim() > 0:
            seen["transition_cov"] = self._fixed_tensor("transition_cov").shape[-1]
        if state_dim is not None:
            seen["state_dim"] = int(state_dim)
        if len(set(seen.values())) > 1:
            described = ", ".join(f"{k} implies {v}" for k, v in seen.items())
            raise ValueError(f"inconsistent state dimension: {described}")
        if not seen:
            raise ValueError("the state dimension is unknown: fix one of the matrices or pass state_dim=")
        return next(iter(seen.values()))

    @property
    def noise_dim(self) -> int:
        return self.state_dim if self.transition_noise_loading is None else self.transition_noise_loading.shape[1]

    def _check_fixed(self):
        n, k = self.state_dim, self.noise_dim
        expected = {"transition_matrix": (n, n), "transition_cov": (k, k), "initial_mean": (n,), "initial_cov": (n, n)}
        for name, shape in expected.items():
            value = self._fixed_tensor(name)
            if value is None or value.dim() == 0:
                continue
            if value.shape[-len(shape):] != shape or value.dim() not in (len(shape), len(shape) + 1) or (
                name.startswith("initial") and value.dim() != len(shape)
            ):
                raise ValueError(f"{name} must be Tensor{list(shape)} (or [T, ...] if time-varying), got {tuple(value.shape)}")
        h = self._fixed_tensor("observation_matrix")
        if h is not None and (h.dim() not in (2, 3) or h.shape[-1] != n):
            raise ValueError(f"observation_matrix must be Tensor[p, {n}] or Tensor[T, p, {n}], got {tuple(h.shape)}")
        for name in ARGUMENTS:
            value = self._fixed_tensor(name)
            if value is not None and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains NaN or infinite values (NaN marks missing data only in y)")
        for name in _COVARIANCES:
            value = self._fixed_tensor(name)
            if value is not None:
                check_covariance(name, value)
            spec = self.specs[name]
            if isinstance(spec, Fixed) and not isinstance(spec.value, torch.Tensor) and spec.value < 0:
                raise ValueError(f"{name} must be positive semi-definite, got {spec.value} * I")

    # -------------------------------------------------------------- values
    def _value(self, name: str, shape: tuple, like: torch.Tensor, default_init: torch.Tensor) -> torch.Tensor:
        spec = self.specs[name]
        is_cov = name in _COVARIANCES
        if isinstance(spec, Fixed):
            if isinstance(spec.value, torch.Tensor):
                value = spec.value.to(dtype=like.dtype, device=like.device)
            else:
                value = like.new_full((), spec.value)
            if value.dim() == 0:
                value = value * (torch.eye(shape[0], dtype=like.dtype, device=like.device) if is_cov else like.new_ones(shape))
            return value
        if isinstance(spec, Hyperprior):
            value = pyro.sample(name, spec.prior)
            return _as_covariance(value, shape[0]) if is_cov else value.expand(shape)
        if spec.diagonal:
            init = default_init.diagonal() if spec.init is None else _init_tensor(spec.init, like) * like.new_ones(shape[0])
            return torch.diag_embed(pyro.param(name, init, constraint=constraints.positive))
        if spec.init is None:
            init = default_init
        else:
            init = _init_tensor(spec.init, like)
            if init.dim() == 0:
                init = init * (torch.eye(shape[0], dtype=like.dtype, device=like.device) if is_cov else like.new_ones(shape))
        return pyro.param(name, init, constraint=constraints.positive_definite if is_cov else constraints.real)

    def state_space_form(self, y: torch.Tensor | None = None, controls: torch.Tensor | None = None, num_steps: int | None = None) -> StateSpaceForm:
        """The matrices of the model on this data (learned ones as ``pyro.param`` sites, priors sampled).

        Args:
            y: Tensor[T, p] or Tensor[B, T, p] (NaN = missing), or ``None`` with ``num_steps`` given.
            controls: Tensor[T, c] or Tensor[B, T, c], or ``None``.
        """
        y, steps, batch, like = self._check_data(y, controls, num_steps)
        n, k = self.state_dim, self.noise_dim
        p = y.shape[-1] if y is not None else self._obs_dim()
        scale = _data_variance(y, like)
        eye = lambda m: torch.eye(m, dtype=like.dtype, device=like.device)  # noqa: E731
        f = self._value("transition_matrix", (n, n), like, eye(n))
        h = self._value("observation_matrix", (p, n), like, torch.eye(p, n, dtype=like.dtype, device=like.device))
        q = self._value("transition_cov", (k, k), like, scale * eye(k))
        r = self._value("observation_cov", (p, p), like, scale * eye(p))
        m0 = self._value("initial_mean", (n,), like, like.new_zeros(n))
        p0 = self._value("initial_cov", (n, n), like, scale * eye(n))
        loading = None
        if self.transition_noise_loading is not None:
            loading = self.transition_noise_loading.to(dtype=like.dtype, device=like.device)
            q = loading @ q @ loading.mT
        self._check_shapes(f, h, q, r, m0, p0, steps, p)
        transition_offset = observation_offset = None
        if controls is not None:
            c = controls.shape[-1]
            b = self._value("control_matrix", (n, c), like, like.new_zeros(n, c))
            transition_offset = controls @ b.mT
            d_spec = self.specs["observation_control_matrix"]
            if not (isinstance(d_spec, Fixed) and not isinstance(d_spec.value, torch.Tensor) and d_spec.value == 0):
                d = self._value("observation_control_matrix", (p, c), like, like.new_zeros(p, c))
                observation_offset = controls @ d.mT
        params = LinearGaussianParams(f, h, q, r, m0, p0, transition_offset, observation_offset)
        observations = y if y is not None else like.new_full(batch + (steps, p), float("nan"))
        if loading is None:
            loading = eye(n)
        return StateSpaceForm(params, observations, dict(self.specs), loading)

    def __call__(self, y: torch.Tensor | None = None, controls: torch.Tensor | None = None, num_steps: int | None = None):
        form = self.state_space_form(y, controls, num_steps)
        batch = form.observations.shape[:-2]
        steps = form.observations.shape[-2]
        plate = pyro.plate("series", batch[0], dim=-1) if batch else _null_context()
        with plate:
            states = pyro.sample(form.states_site, GaussMarkovChain(form.params, steps, batch))
            return pyro.sample(form.obs_site, LinearGaussianObservations(form.params, states), obs=y)

    # -------------------------------------------------------------- checks
    def _obs_dim(self) -> int:
        for name, axis in (("observation_matrix", -2), ("observation_cov", -1)):
            value = self._fixed_tensor(name)
            if value is not None and value.dim() > 0:
                return value.shape[axis]
        raise ValueError("the observation dimension is unknown without y: fix observation_matrix or pass y")

    def _check_data(self, y, controls, num_steps):
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
            if y.dim() not in (2, 3):
                raise ValueError(f"y must be Tensor[T, p] or Tensor[B, T, p], got shape {tuple(y.shape)}")
            if not y.is_floating_point():
                raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
            if y.device.type != "meta" and bool(torch.isinf(y).any()):
                raise ValueError("y contains infinite values (NaN marks a missing entry; infinity is not allowed)")
            steps, batch, like = y.shape[-2], tuple(y.shape[:-2]), y
        if controls is not None:
            if not isinstance(controls, torch.Tensor) or controls.dim() not in (2, 3):
                raise ValueError("controls must be Tensor[T, c] or Tensor[B, T, c]")
            if controls.device.type != "meta" and not bool(torch.isfinite(controls).all()):
                raise ValueError("controls contain NaN or infinite values (only y may have missing entries)")
            if y is not None:
                if controls.shape[-2] != steps or (controls.dim() == 3 and tuple(controls.shape[:-2]) != batch):
                    raise ValueError(f"controls {tuple(controls.shape)} do not match y {tuple(y.shape)} in length or batch")
                if controls.device != y.device:
                    raise ValueError(f"controls on {controls.device} but y on {y.device}; put all data on one device")
            else:
                steps, batch, like = controls.shape[-2], tuple(controls.shape[:-2]), controls
        if y is None and controls is None:
            if num_steps is None:
                raise ValueError("pass y, controls or num_steps")
            steps, batch = int(num_steps), ()
            like = next((v for v in map(self._fixed_tensor, ARGUMENTS) if v is not None and v.is_floating_point()), None)
            if like is None:
                raise ValueError("without data, at least one fixed floating-point matrix gives the dtype and device")
        if steps < 1:
            raise ValueError("the series must have at least one time step")
        return y, steps, batch, like

    def _check_shapes(self, f, h, q, r, m0, p0, steps, p):
        n = self.state_dim
        checks = (
            ("transition_matrix", f, (n, n), True),
            ("observation_matrix", h, (p, n), True),
            ("transition_cov", q, (n, n), True),
            ("observation_cov", r, (p, p), True),
            ("initial_mean", m0, (n,), False),
            ("initial_cov", p0, (n, n), False),
        )
        for name, value, shape, may_vary in checks:
            ok = value.shape == shape or (may_vary and value.dim() == 3 and value.shape[1:] == shape and value.shape[0] >= steps)
            if not ok:
                raise ValueError(
                    f"{name} must be Tensor{list(shape)}" + (f" or Tensor[T >= {steps}, ...]" if may_vary else "")
                    + f" for these data, got {tuple(value.shape)}"
                )

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={type(spec).__name__}" for name, spec in self.specs.items())
        return f"LinearGaussianSSM(state_dim={self.state_dim}, {shown})"


def check_covariance(name: str, value: torch.Tensor, tolerance: float = 1e-10) -> None:
    """Raises unless ``value`` (Tensor[..., m, m]) is symmetric positive semi-definite."""
    if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(value.shape)}")
    if value.device.type == "meta":
        return
    scale = value.abs().amax().clamp_min(1e-300)
    if not bool(torch.allclose(value, value.mT, atol=float(scale) * 1e-8)):
        raise ValueError(f"{name} must be symmetric")
    smallest = torch.linalg.eigvalsh(value.double()).min()
    if float(smallest) < -tolerance * float(scale) * 1e3:
        raise ValueError(f"{name} must be positive semi-definite; its smallest eigenvalue is {float(smallest):.3g}")


def _init_tensor(init, like: torch.Tensor) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        return init.to(dtype=like.dtype, device=like.device)
    return like.new_full((), float(init))


def _as_covariance(value: torch.Tensor, size: int) -> torch.Tensor:
    if value.dim() >= 2 and value.shape[-2:] == (size, size):
        return value
    if value.dim() >= 1 and value.shape[-1] == size:
        return torch.diag_embed(value)
    return value.unsqueeze(-1).unsqueeze(-1) * torch.eye(size, dtype=value.dtype, device=value.device)


def _data_variance(y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The observations' variance (missing entries ignored), a positive scalar that never syncs the device."""
    if y is None:
        return like.new_ones(())
    observed = ~torch.isnan(y)
    count = observed.sum().clamp_min(2).to(y.dtype)
    zeroed = torch.where(observed, y, torch.zeros_like(y))
    mean = zeroed.sum() / count
    var = torch.where(observed, (y - mean).pow(2), torch.zeros_like(y)).sum() / (count - 1)
    return var.clamp_min(torch.finfo(y.dtype).tiny ** 0.5).detach()


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
