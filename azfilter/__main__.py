"""``python -m azfilter`` and the ``azfilter`` console script: the ``azfilter`` command."""

import os
import sys

from .cli import run


def entry() -> None:
    """Run the command (:func:`azfilter.cli.run`), then :func:`leave` with its status."""
    leave(run())


def leave(status: int) -> None:
    """End the process with ``status`` at once, once the command has returned.

    By then every output is written, closed and renamed into place, the cache's background
    stores are joined and the summary is printed; what remains is the interpreter's teardown,
    which on a GPU node releases the OpenCL contexts and page-locked buffers one by one
    (H200 node, 20-frame runs: 1.71-1.73 s against 1.67-2.18 s with the teardown). The
    streams are flushed and logging shut down first, then ``os._exit`` lets the operating
    system free it all.
    """
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing more to say
            pass
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    entry()
