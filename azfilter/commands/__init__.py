"""The subcommands other than the reductions, one module each, imported only when run
(``azfilter info`` does not load the engines, ``azfilter --help`` loads nothing)."""
