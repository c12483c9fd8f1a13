"""Option types of the reduction commands (click plumbing kept out of cli.py)."""

from __future__ import annotations

from typing import Any

import click

from .. import config as cfg
from ..errors import AzfilterError


class ReductionCommand(click.Command):
    """A click command whose ``--percentile`` takes one or two numbers (``40`` or ``40 60``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, join_percentile(list(args)))


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_percentile(args: list[str]) -> list[str]:
    """Rewrite ``--percentile 40 60`` as ``--percentile 40,60`` (click options take a fixed
    number of values)."""
    out: list[str] = []
    k = 0
    while k < len(args):
        arg = args[k]
        if arg == "--":
            out.extend(args[k:])
            break
        if arg == "--percentile" and k + 1 < len(args):
            value = args[k + 1]
            if k + 2 < len(args) and is_number(value) and is_number(args[k + 2]):
                out += [arg, f"{value},{args[k + 2]}"]
                k += 3
                continue
            out += [arg, value]
            k += 2
            continue
        out.append(arg)
        k += 1
    return out


class ShardType(click.ParamType):
    name = "I/N"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            shard = cfg.parse_shard(value, "--shard")
        except AzfilterError as err:
            self.fail(str(err).removeprefix("--shard: "), param, ctx)
        return f"{shard[0]}/{shard[1]}" if shard else ""


class PercentileType(click.ParamType):
    name = "P [P]"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            return cfg.parse_percentile(value, "--percentile")
        except AzfilterError as err:
            self.fail(str(err).removeprefix("--percentile: "), param, ctx)
