"""Subcommands of the ``azfilter`` launcher that live in their own modules."""
