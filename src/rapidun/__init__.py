"""rapidun: influence-driven unlearning (RapidUn) for fine-tuned causal language models.

The Python API (:mod:`rapidun.api`) is importable from here — ``rapidun.unlearn``, ``rapidun.evaluate``,
``rapidun.verify``, ``rapidun.trace``, ``rapidun.finetune`` and ``rapidun.UnlearnResult`` — and loaded on first
use, so ``import rapidun`` stays cheap (no torch, no transformers).

Four of these names are also submodules (:mod:`rapidun.unlearn`, :mod:`rapidun.verify`, :mod:`rapidun.trace`,
:mod:`rapidun.finetune`): import those by their full name (``from rapidun.unlearn import unlearn``); the package
attribute stays the API function even after such an import.
"""

import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = ("unlearn", "evaluate", "verify", "trace", "finetune", "UnlearnResult")
__all__ = ["__version__", *_API]


class _Package(types.ModuleType):
    """The package: importing a submodule named like an API function does not replace the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # the import system binds a loaded submodule on its parent; it stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _API:
        from rapidun import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rapidun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
