"""Compute engines: the per-bin sums of integrate, sigma_clip and medfilt.

Every engine (``python``, ``cython``, ``opencl``) implements :class:`~.base.Engine`
(``docs/internals.md``, "Engine interface") and returns :class:`BinSums`;
:mod:`azfilter.integrator` turns the sums into intensities and errors. Engines are imported
lazily so that a missing compiled extension or a missing OpenCL driver only matters to whoever
asks for that backend.
"""

from __future__ import annotations

import importlib
import importlib.util

from .. import vocabulary
from ..errors import AzfilterError
from ..vocabulary import ERROR_MODELS
from .base import OPERATION_PARAMETERS, Engine, FrameBufferRing, check_operation
from .sums import BinSums, OutlierSums

#: backend name -> (module, class name)
_ENGINE_CLASSES = {"python": "PythonEngine", "cython": "CythonEngine", "opencl": "OpenCLEngine"}
BACKENDS: dict[str, tuple[str, str]] = {
    name: (name, _ENGINE_CLASSES[name]) for name in vocabulary.BACKENDS
}

#: how to install what the OpenCL backend needs from Python (pyopencl is an optional extra)
OPENCL_INSTALL_HINT = "pip install 'azfilter[opencl]' (or pip install pyopencl)"

# What to tell the user when a backend cannot be imported.
_HINTS = {
    "cython": "the compiled extension is missing; build the package (pip install -e . or make "
    "install)",
    "opencl": "pyopencl or an OpenCL driver is missing (install pocl-opencl-icd for CPU OpenCL)",
}

# Optional packages a backend needs, checked before the backend is chosen, so that a missing
# one is a usage error up front rather than a failure at the first frame.
_REQUIRES = {"opencl": ("pyopencl", OPENCL_INSTALL_HINT)}


def parse_error_model(name: str) -> str:
    """Return the canonical error-model name for ``name``.

    Parameters
    ----------
    name : str
        ``"poisson"``, ``"azimuthal"``, ``"hybrid"`` or ``"variance"``, in any case; an
        unambiguous prefix (``"p"``, ``"az"``) is accepted.

    Returns
    -------
    str
        One of :data:`ERROR_MODELS`.

    Raises
    ------
    AzfilterError
        For anything else (unlike pyFAI, which silently maps unknown names to "no error").
    """
    choices = ", ".join(ERROR_MODELS)
    if not isinstance(name, str) or not name.strip():
        raise AzfilterError(f"error model must be one of {choices}, got {name!r}")
    wanted = name.strip().lower()
    matches = [model for model in ERROR_MODELS if model.startswith(wanted)]
    if len(matches) != 1:
        raise AzfilterError(f"unknown error model {name!r}; choose one of {choices}")
    return matches[0]


def get_engine_class(backend: str) -> type:
    """Import and return the engine class of a backend.

    Parameters
    ----------
    backend : str
        ``"python"``, ``"cython"`` or ``"opencl"`` (case-insensitive).

    Raises
    ------
    AzfilterError
        When the name is unknown, or the backend cannot be used here (compiled extension not
        built, pyopencl or an OpenCL driver missing); a missing pyopencl says how to install it.
    """
    key = backend.strip().lower() if isinstance(backend, str) else backend
    if key not in BACKENDS:
        raise AzfilterError(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    module_name, class_name = BACKENDS[key]
    if key in _REQUIRES:
        package, install = _REQUIRES[key]
        if importlib.util.find_spec(package) is None:
            raise AzfilterError(f"backend {key!r} needs {package}, which is not installed: "
                                f"{install}")
    try:
        module = importlib.import_module(f".{module_name}", __name__)
        return getattr(module, class_name)
    except AzfilterError:
        raise
    except Exception as err:  # ImportError, OSError, pyopencl's errors: all mean unusable here
        hint = _HINTS.get(key, "")
        raise AzfilterError(
            f"backend {key!r} is not available: {hint} ({type(err).__name__}: {err})"
        ) from err


__all__ = ["BACKENDS", "ERROR_MODELS", "OPERATION_PARAMETERS", "BinSums", "Engine",
           "OutlierSums", "FrameBufferRing", "check_operation", "get_engine_class",
           "parse_error_model"]
