"""Feeding data to :class:`~bmm_ppl.inference.SVI`: tensor arguments, minibatches and their scaling,
and passes over a ``DataLoader``."""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger


class ScaleInPlate(Messenger):
    """Multiplies the log-density of every site inside plate ``name`` by ``factor`` (minibatch scaling)."""

    def __init__(self, name: str, factor: float):
        super().__init__()
        self.name, self.factor = name, factor

    def _pyro_sample(self, msg):
        if any(frame.name == self.name for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


class DataArguments:
    """The model's arguments, with the tensors pulled out so they can be sliced or fed to a compiled graph."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.positions = [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]
        self.keys = sorted(k for k, v in self.kwargs.items() if isinstance(v, torch.Tensor))

    @property
    def tensors(self) -> tuple:
        return tuple(self.args[i] for i in self.positions) + tuple(self.kwargs[k] for k in self.keys)

    def named(self) -> dict[str, torch.Tensor]:
        names = [f"argument {i}" for i in self.positions] + list(self.keys)
        return dict(zip(names, self.tensors))

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for i, value in zip(self.positions, tensors[: len(self.positions)]):
            args[i] = value
        for k, value in zip(self.keys, tensors[len(self.positions) :]):
            kwargs[k] = value
        return tuple(args), kwargs


class LoaderPasses:
    """Re-iterable view of a DataLoader as model argument tuples (one pass per iteration)."""

    def __init__(self, loader, as_args):
        self.loader, self.as_args = loader, as_args

    def __iter__(self):
        return (self.as_args(batch) for batch in self.loader)


def minibatches(num_data: int, batch_size: int, device):
    """Endless index tensors of ``batch_size``: shuffled epochs, the incomplete tail of each dropped."""
    per_epoch = num_data // batch_size
    while True:
        order = torch.randperm(num_data, device=device)
        for b in range(per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]
