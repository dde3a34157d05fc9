"""Checks of user data at the boundary, each naming the argument and what was expected."""

from __future__ import annotations

import torch

from bmm_ppl.capture_state import is_capturing


def check_tensor(name: str, value, *, dim: tuple[int, ...] | int | None = None, finite: bool = True) -> torch.Tensor:
    """Returns ``value`` as a tensor after checking its rank and that it holds no NaN or infinity.

    Example:
        >>> check_tensor("x", torch.ones(3), dim=(1, 2)).shape
        torch.Size([3])
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None:
        allowed = (dim,) if isinstance(dim, int) else tuple(dim)
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    # Value checks are skipped while tracing (jit capture of a potential): the data were checked when
    # the model was first run, and a data-dependent branch would freeze into the graph.
    if finite and value.device.type != "meta" and value.is_floating_point() and not _tracing():
        bad = ~torch.isfinite(value)
        if bad.any():
            kind = "NaN" if torch.isnan(value).any() else "infinite values"
            raise ValueError(f"{name} contains {kind} ({int(bad.sum())} of {value.numel()} entries)")
    return value


def _tracing() -> bool:
    return torch.jit.is_tracing() or is_capturing()


def check_same_length(**tensors: torch.Tensor) -> int:
    """Checks that every given tensor has the same first dimension and returns it."""
    # int(): under jit tracing shapes are tensors, and two equal tensors are distinct set members.
    lengths = {name: int(t.shape[0]) for name, t in tensors.items() if t is not None}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{n} has {k}" for n, k in lengths.items())
        raise ValueError(f"data of different lengths: {described} rows; they must match")
    return next(iter(lengths.values()))


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Checks that all given tensors live on one device and returns it."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        described = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"data on different devices ({described}); put all data on one device")
    return next(iter(devices.values()))


def check_positive(name: str, value) -> None:
    """Raises unless ``value`` (a number or tensor) is strictly positive everywhere."""
    tensor = torch.as_tensor(value)
    if tensor.device.type != "meta" and not bool((tensor > 0).all()):
        raise ValueError(f"{name} must be positive, got {value}")


def prepare_data(args: tuple, kwargs: dict, device=None) -> tuple[tuple, dict]:
    """The engines' common entry check: moves tensor arguments to ``device`` (``None``: leave them where
    they are), then checks that they share one device and hold no NaN or infinity, naming each bad one.

    Example:
        >>> args, kwargs = prepare_data((torch.ones(3), 2), {"y": torch.zeros(3)})
        >>> args[1], kwargs["y"].shape
        (2, torch.Size([3]))
    """

    def move(value):
        return value.to(device) if device is not None and isinstance(value, torch.Tensor) else value

    args = tuple(move(a) for a in args)
    kwargs = {k: move(v) for k, v in kwargs.items()}
    tensors = {f"argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    tensors.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    if tensors:
        check_same_device(**tensors)
    for name, value in tensors.items():
        check_tensor(name, value)
    return args, kwargs
