"""Checks of user data at the boundary, each naming the argument and what was expected."""

from __future__ import annotations

import torch

from bmm_ppl.capture_state import is_capturing


def check_tensor(name: str, value, *, dim: tuple[int, ...] | int | None = None, finite: bool = True) -> torch.Tensor:
    """Returns ``value`` as a tensor after checking its rank and that it holds no NaN or infinity.

    Examples:
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


def check_nonempty(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raises unless ``value`` has at least one row (its first dimension is not zero).

    Examples:
        >>> check_nonempty("x", torch.ones(2, 0)).shape
        torch.Size([2, 0])
    """
    if value.dim() > 0 and value.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}): the data need at least one row")
    return value


def check_same_float_dtype(**tensors: torch.Tensor) -> torch.dtype | None:
    """Checks that every floating-point tensor given has one dtype and returns it (``None`` when none is
    floating). Integer and boolean tensors (labels, indices, counts, masks) are not compared.

    Examples:
        >>> check_same_float_dtype(x=torch.ones(2, dtype=torch.float64), task=torch.zeros(2, dtype=torch.long))
        torch.float64
    """
    dtypes = {name: t.dtype for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(set(dtypes.values())) > 1:
        described = ", ".join(f"{n} is {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise ValueError(
            f"data of different floating-point dtypes ({described}); convert them to one dtype "
            "(e.g. all .double() or all .float())"
        )
    return next(iter(dtypes.values()), None)


def as_real_valued(name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a floating-point tensor: integer or boolean data are converted to ``dtype`` (the default
    float dtype when ``None``), floating data pass unchanged, complex data are refused.

    For the real-valued arguments of regression models (inputs, targets): computing with them in an
    integer dtype would truncate every number derived from them (a noise precision 1.9 would become 1).

    Examples:
        >>> as_real_valued("x", torch.arange(3), torch.float64)
        tensor([0., 1., 2.], dtype=torch.float64)
    """
    if value.is_floating_point():
        return value
    if value.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {value.dtype}")
    return value.to(torch.get_default_dtype() if dtype is None else dtype)


def _argument_names(model, count: int) -> list[str]:
    """Names of the first ``count`` positional arguments of ``model`` (``"argument i"`` where unknown)."""
    import inspect

    names = [f"argument {i}" for i in range(count)]
    if model is None:
        return names
    try:
        parameters = list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):
        return names
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, parameter_name in enumerate(positional[:count]):
        names[i] = f"{parameter_name} (argument {i})"
    return names


def prepare_data(args: tuple, kwargs: dict, device=None, model=None) -> tuple[tuple, dict]:
    """The engines' common entry check: moves tensor arguments to ``device`` (``None``: leave them where
    they are), then checks that they share one device, hold no NaN or infinity, are not empty (zero rows)
    and that the floating-point ones share one dtype, naming each bad one (by the parameter name of
    ``model``'s signature where ``model`` is given, else by position).

    Integer and boolean tensors pass unchanged: they may be labels, task indices, counts or masks. A model
    whose arguments are real-valued converts them itself (see :func:`as_real_valued`).

    Examples:
        >>> args, kwargs = prepare_data((torch.ones(3), 2), {"y": torch.zeros(3)})
        >>> args[1], kwargs["y"].shape
        (2, torch.Size([3]))
    """

    def move(value):
        return value.to(device) if device is not None and isinstance(value, torch.Tensor) else value

    args = tuple(move(a) for a in args)
    kwargs = {k: move(v) for k, v in kwargs.items()}
    names = _argument_names(model, len(args))
    tensors = {names[i]: a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    tensors.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    if tensors:
        check_same_device(**tensors)
        check_same_float_dtype(**tensors)
    for name, value in tensors.items():
        check_tensor(name, value)
        check_nonempty(name, value)
    return args, kwargs
