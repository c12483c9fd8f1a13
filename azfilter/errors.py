"""Errors a user can cause.

Every such error is an :class:`AzfilterError` whose message is one line naming the file (or
option) and what is wrong.  The command line prints it without a traceback.
"""

from __future__ import annotations


class AzfilterError(Exception):
    """A user-caused error (bad file, bad option, wrong shape); ``str(err)`` is one line."""


class FrameReadError(AzfilterError):
    """A data file or one of its frames could not be read.

    Attributes
    ----------
    source : str
        The file that failed.
    index : int or None
        The frame index inside the file, when known.
    """

    def __init__(self, source: str, index: int | None, reason: str):
        where = source if index is None else f"{source} frame {index}"
        super().__init__(f"{where}: {reason}")
        self.source = source
        self.index = index
        self.reason = reason


class RunFailed(AzfilterError):
    """A run stopped part-way because an output could not be written (exit status 3)."""
