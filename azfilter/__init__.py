"""azfilter: batch azimuthal integration with outlier rejection for X-ray diffraction.

Public names are imported lazily so that ``azfilter --help`` and small scripts start fast.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AzfilterError": "errors",
    "FrameReadError": "errors",
    "Detector": "detectors",
    "get_detector": "detectors",
    "Frame": "frames",
    "open_frames": "frames",
    "load_image": "frames",
    "Geometry": "geometry",
    "load_poni": "poni",
    "Integrator": "integrator",
    "Result": "integrator",
    "UNITS": "units",
    "get_unit": "units",
    "run_job": "pipeline",
    "load_job": "pipeline",
    "JobReport": "pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
