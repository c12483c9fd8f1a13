"""``azfilter devices``: the OpenCL platforms and devices, or why there are none."""

from __future__ import annotations

from typing import Any

import click

from .common import CONTEXT


@click.command("devices", context_settings=CONTEXT,
               epilog="\b\nExample:\n  azfilter devices")
def devices_command() -> None:
    """List the OpenCL platforms and devices usable with --backend opencl (or say why
    there are none). Select one with --device gpu|cpu|P:D, several with --device 0:0,0:1
    or --device all (every GPU)."""
    try:
        from ..backends import opencl
    except Exception as err:  # noqa: BLE001 - pyopencl or the driver may be missing
        click.echo(f"No OpenCL: {type(err).__name__}: {err}")
        return
    try:
        devices = list(opencl.list_devices())
    except Exception as err:  # noqa: BLE001
        devices = []
        click.echo(f"No OpenCL: {err}")
    if not devices:
        status = getattr(opencl, "opencl_status", None)
        reason = status() if callable(status) else "no OpenCL platform found"
        click.echo(f"No OpenCL device: {reason}")
        return
    platform_shown = None
    for device in devices:
        if isinstance(device, dict) and device.get("platform_name") != platform_shown:
            platform_shown = device.get("platform_name")
            click.echo(f"platform {device.get('platform', '?')}: {platform_shown}")
        click.echo("  " + format_device(device))
    click.echo("Select one with --backend opencl --device P:D (or gpu / cpu); spread the "
               "frames over several with --device P:D,P:D or --device all (every GPU).")


def format_device(device: Any) -> str:
    """One line for a device description from ``list_devices``."""
    if not isinstance(device, dict):
        return str(device)
    parts = [str(device.get("id", "?")), str(device.get("type", "")),
             str(device.get("name", "")).strip()]
    details = []
    if device.get("global_memory"):
        details.append(f"{float(device['global_memory']) / 2**30:.1f} GiB")
    if device.get("compute_units"):
        details.append(f"{device['compute_units']} compute units")
    if "fp64" in device:
        details.append(f"fp64 {'yes' if device['fp64'] else 'no'}")
    if device.get("version"):
        details.append(str(device["version"]).strip())
    text = "  ".join(p for p in parts if p)
    return f"{text} ({', '.join(details)})" if details else text
