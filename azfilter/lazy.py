"""Lazy public names of a package (PEP 562): imported from their module on first use.

Used by :mod:`azfilter` and :mod:`azfilter.output`, so that ``azfilter --help`` and jobs that
do not need a module (a text job and the NeXus writer) never import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any],
                 names: list[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : dict
        Public name -> submodule (relative to ``package``) that defines it.
    namespace : dict
        The package's ``globals()``: a name, once imported, is stored there (later lookups
        do not come back here).
    names : list of str
        What ``dir(package)`` lists (its ``__all__``).
    """
    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
