"""PONI files: pyFAI's geometry format (versions 1, 2, 2.1, 3) as :class:`Geometry`.

The parsing and formatting live in :mod:`azfilter.poni_format`, which builds no Geometry;
this module and ``Geometry.from_poni`` turn its fields into one. (That cut keeps geometry
and the PONI reader free of an import cycle.)
"""

from __future__ import annotations

import os

from .geometry import Geometry
from .poni_format import format_poni, read_poni_fields, save_poni, write_poni_text
from .poni_format import parse_poni_fields as _parse_poni_fields

__all__ = ["format_poni", "load_poni", "parse_poni", "save_poni", "write_poni_text"]


def parse_poni(text: str, source: str = "<string>") -> Geometry:
    """Parse the text of a PONI file.

    Parameters
    ----------
    text : str
        The file's content.
    source : str
        Name used in error messages and kept as ``Geometry.source``.

    Returns
    -------
    Geometry

    Raises
    ------
    AzfilterError
        One line naming ``source`` and the key (see :mod:`azfilter.poni_format`).
    """
    return Geometry(**_parse_poni_fields(text, source=source))


def load_poni(path: str | os.PathLike) -> Geometry:
    """Read a PONI file (versions 1, 2, 2.1, 3).

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    Geometry
        With ``source`` set to ``path``.

    Raises
    ------
    AzfilterError
        When the file cannot be read, or its content is bad.
    """
    return Geometry(**read_poni_fields(path))
