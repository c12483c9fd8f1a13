"""``python -m azfilter``: the ``azfilter`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
