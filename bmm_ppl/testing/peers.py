"""Importing the peers the benchmarks and cross-checks compare against (the ``[bench]`` extra).

laplace-torch imports torchmetrics, which imports torchvision's image models when torchvision is
installed; the ``[bench]`` extra pins ``torchvision==0.28.0`` so that pip keeps the installed torch, but
beside some torch builds (the CPU wheel of torch 2.13 among them) torchvision's compiled operators do
not register and ``import torchvision`` fails ("operator torchvision::nms does not exist"). laplace-torch
uses none of torchvision, so where the real import fails it is imported with torchvision replaced by a
stand-in whose every attribute is another stand-in and which raises if called.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is a stand-in: torchvision does not load beside this torch build")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_laplace_torch():
    """``laplace`` (laplace-torch), or ``None`` where it is not installed.

    Examples:
        >>> laplace = import_laplace_torch()
        >>> laplace is None or callable(laplace.Laplace)
        True
    """
    try:
        importlib.import_module("torchvision")
    except ModuleNotFoundError:
        pass
    except Exception:  # installed but broken beside this torch: stand it in
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _StandInFinder())
    try:
        import laplace
    except ModuleNotFoundError:
        return None
    return laplace


__all__ = ["import_laplace_torch"]
