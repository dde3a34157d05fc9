"""Whether a graph of tensor operations is being recorded now (ground floor: validation reads it).

Value checks (``if bad.any(): raise``) must be skipped while recording, since a data-dependent branch
cannot be recorded; the data were checked before capture.
"""

from __future__ import annotations

import contextlib

_capturing = [False]


def is_capturing() -> bool:
    """Whether :func:`recording` is active."""
    return _capturing[0]


@contextlib.contextmanager
def recording():
    """Marks the enclosed code as being recorded into a graph (re-entrant)."""
    previous, _capturing[0] = _capturing[0], True
    try:
        yield
    finally:
        _capturing[0] = previous
