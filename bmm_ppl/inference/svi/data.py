"""Feeding data to :class:`~bmm_ppl.inference.SVI`: minibatch indices and passes over a ``DataLoader``
(the argument splitter and the minibatch scaling live in :mod:`bmm_ppl.inference.program.minibatch`)."""

from __future__ import annotations

import torch


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
