"""OpenCL device discovery and selection (``azfilter devices``, ``--device``).

``pyopencl`` is imported only when a function here is called: the rest of azfilter imports
and runs without it. Contexts are shared by every engine of the process (one per device).
"""

from __future__ import annotations

import threading
from typing import Any

from ...errors import AzfilterError
from ...vocabulary import ALL_GPUS_WORDS, parse_device_spec
from .. import OPENCL_INSTALL_HINT

_CONTEXTS: dict[tuple[int, int], Any] = {}
_LOCK = threading.Lock()


def import_pyopencl():
    """Return the pyopencl module, or raise AzfilterError saying it is missing."""
    try:
        import pyopencl
    except ImportError as err:
        raise AzfilterError(f"OpenCL backend unavailable: pyopencl is not installed: "
                            f"{OPENCL_INSTALL_HINT}") from err
    return pyopencl


def _device_type_name(cl, device) -> str:
    for flag, name in ((cl.device_type.GPU, "GPU"), (cl.device_type.CPU, "CPU"),
                       (cl.device_type.ACCELERATOR, "ACCELERATOR")):
        if device.type & flag:
            return name
    return "OTHER"


def _describe(cl, platform_index: int, device_index: int, platform, device) -> dict:
    return {
        "id": f"{platform_index}:{device_index}",
        "platform": platform_index,
        "device": device_index,
        "platform_name": platform.name.strip(),
        "name": device.name.strip(),
        "type": _device_type_name(cl, device),
        "version": device.version.strip(),
        "driver_version": device.driver_version.strip(),
        "global_memory": int(device.global_mem_size),
        "local_memory": int(device.local_mem_size),
        "max_work_group_size": int(device.max_work_group_size),
        "compute_units": int(device.max_compute_units),
        "fp64": "cl_khr_fp64" in device.extensions.split(),
    }


#: _enumerate's answer, once per process: the devices do not change while it runs, and each
#: enumeration asks every platform (0.25 s of the start-up on the H200 machine, where the
#: device was selected three times: for the decode choice, the readers' buffers, the engine)
_FOUND: list[tuple[dict, Any]] | None = None


def _enumerate(cl) -> list[tuple[dict, Any]]:
    """(description, cl.Device) of every device of every platform that answers (asked once
    per process)."""
    global _FOUND
    with _LOCK:
        if _FOUND is None:
            _FOUND = _ask_platforms(cl)
        return list(_FOUND)


def _ask_platforms(cl) -> list[tuple[dict, Any]]:
    found = []
    for platform_index, platform in enumerate(cl.get_platforms()):
        try:
            devices = platform.get_devices()
        except cl.Error:    # a platform without devices raises DEVICE_NOT_FOUND
            continue
        for device_index, device in enumerate(devices):
            found.append((_describe(cl, platform_index, device_index, platform, device),
                          device))
    return found


def list_devices() -> list[dict]:
    """Every OpenCL device this process can use.

    Returns
    -------
    list of dict
        One dict per device with keys ``id`` (``"P:D"``, what ``device=`` accepts),
        ``platform``, ``device`` (indices), ``platform_name``, ``name``, ``type`` (``"GPU"``,
        ``"CPU"``, ``"ACCELERATOR"``, ``"OTHER"``), ``version``, ``driver_version``,
        ``global_memory`` and ``local_memory`` (bytes), ``max_work_group_size``,
        ``compute_units`` and ``fp64`` (double precision available). Empty when pyopencl is
        missing or no platform answers; :func:`opencl_status` says why.
    """
    try:
        cl = import_pyopencl()
        return [info for info, _ in _enumerate(cl)]
    except Exception:   # AzfilterError, cl.Error from a broken ICD loader: nothing usable
        return []


def opencl_status() -> str:
    """One paragraph saying whether OpenCL is usable here and, if not, why.

    Returns
    -------
    str
        e.g. ``"OpenCL: 1 device(s): 0:0 CPU pthread-skylake... (Portable Computing
        Language)"`` or the reason none is available (pyopencl missing, no platform, an ICD
        loader error), with a hint on how to fix it.
    """
    try:
        import pyopencl as cl
    except ImportError:
        return f"OpenCL unavailable: pyopencl is not installed: {OPENCL_INSTALL_HINT}"
    try:
        platforms = cl.get_platforms()
    except Exception as err:   # PLATFORM_NOT_FOUND_KHR when the ICD loader finds no driver
        return ("OpenCL unavailable: no OpenCL platform found "
                f"({type(err).__name__}: {err}); install a driver (pocl-opencl-icd for CPUs, "
                "the GPU vendor's OpenCL ICD) and check /etc/OpenCL/vendors or "
                "$OCL_ICD_VENDORS")
    if not platforms:
        return ("OpenCL unavailable: the ICD loader lists no platform; install a driver "
                "(pocl-opencl-icd) and check /etc/OpenCL/vendors")
    lines, problems = [], []
    for platform_index, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except Exception as err:
            problems.append(f"platform {platform_index} ({platform.name.strip()}): "
                            f"{type(err).__name__}: {err}")
            continue
        for device_index, device in enumerate(devices):
            info = _describe(cl, platform_index, device_index, platform, device)
            lines.append(f"{info['id']} {info['type']} {info['name']} "
                         f"({info['platform_name']}, {info['global_memory'] / 2**30:.1f} GiB, "
                         f"{info['compute_units']} compute units, "
                         f"fp64 {'yes' if info['fp64'] else 'no'})")
    if not lines:
        return "OpenCL unavailable: platforms found but no device: " + "; ".join(problems)
    text = f"OpenCL: {len(lines)} device(s): " + "; ".join(lines)
    if problems:
        text += " (ignored: " + "; ".join(problems) + ")"
    return text


def select_device(device: str | None = None) -> tuple[dict, Any]:
    """Resolve a ``device=`` choice to (description, ``pyopencl.Device``).

    Parameters
    ----------
    device : str or None
        ``"gpu"`` (the best GPU), ``"cpu"``, ``"P:D"`` (platform and device indices, as
        :func:`list_devices` ``id``), or None: the best GPU, else a CPU, else anything.

    Raises
    ------
    AzfilterError
        When pyopencl or a platform is missing, or the choice does not exist (the message
        lists the devices that do).
    """
    cl = import_pyopencl()
    try:
        found = _enumerate(cl)
    except Exception as err:
        raise AzfilterError(opencl_status()) from err
    if not found:
        raise AzfilterError(opencl_status())
    available = ", ".join(f"{info['id']} ({info['type']} {info['name']})" for info, _ in found)

    def best(kind: str | None):
        ranked = [item for item in found if kind is None or item[0]["type"] == kind]
        # GPUs first, then double precision, then memory, then compute units
        ranked.sort(key=lambda item: (item[0]["type"] == "GPU", item[0]["type"] == "CPU",
                                      item[0]["fp64"], item[0]["global_memory"],
                                      item[0]["compute_units"]), reverse=True)
        return ranked[0] if ranked else None

    choice = None if device is None else str(device).strip().lower()
    if choice in (None, "", "auto"):
        return best(None)
    if choice in ("gpu", "cpu"):
        picked = best(choice.upper())
        if picked is None:
            raise AzfilterError(f"--device {device}: no OpenCL {choice.upper()} found; "
                                f"available: {available}")
        return picked
    parts = choice.split(":")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        wanted = (int(parts[0]), int(parts[1]))
        for info, dev in found:
            if (info["platform"], info["device"]) == wanted:
                return info, dev
        raise AzfilterError(f"--device {device}: no OpenCL device {wanted[0]}:{wanted[1]}; "
                            f"available: {available}")
    raise AzfilterError(f"--device {device!r}: expected 'gpu', 'cpu' or 'P:D' "
                        f"(platform:device); available: {available}")


def select_devices(device: str | list[str] | None = None) -> list[tuple[dict, Any]]:
    """Resolve a ``--device`` value that may name several devices.

    Parameters
    ----------
    device : str, list of str or None
        What :func:`select_device` takes, or several of those separated by commas
        (``"0:0,0:1"``) or in a list, or ``"all"`` (also ``"gpus"``, ``"all-gpus"``): every
        GPU, in ``azfilter devices`` order. A device named twice appears twice (two engines
        will share its context).

    Returns
    -------
    list of (dict, pyopencl.Device)
        In the order named; one item for None (the best device).

    Raises
    ------
    AzfilterError
        For a value that names no device, a device that does not exist, or ``all`` where
        there is no GPU (the message lists the devices that exist).
    """
    try:
        tokens = parse_device_spec(device)
    except ValueError as err:
        raise AzfilterError(str(err)) from None
    if tokens is None:
        return [select_device(None)]
    cl = import_pyopencl()
    picked = []
    for token in tokens:
        if token not in ALL_GPUS_WORDS:
            picked.append(select_device(token))
            continue
        try:
            found = _enumerate(cl)
        except Exception as err:
            raise AzfilterError(opencl_status()) from err
        gpus = [item for item in found if item[0]["type"] == "GPU"]
        if not gpus:
            available = ", ".join(f"{info['id']} ({info['type']} {info['name']})"
                                  for info, _ in found) or opencl_status()
            raise AzfilterError(f"--device {token}: no OpenCL GPU found; available: "
                                f"{available}")
        picked.extend(gpus)
    return picked



def warm_up(device: str | list[str] | None) -> threading.Thread:
    """Start, in a thread, what the first engine on ``device`` waits for: pyopencl's import,
    the device list and the devices' contexts (0.3-0.5 s on the H200 machine), so that they
    overlap the lookup table's loading. Errors are left to the engine, which meets them
    again and reports them; join the thread before the process ends.
    """
    def prepare() -> None:
        try:
            cl = import_pyopencl()
            for info, found in select_devices(device):
                device_context(cl, info, found)
        except Exception:  # noqa: BLE001 - the engine reports the same error itself
            pass

    thread = threading.Thread(target=prepare, name="azfilter-opencl-start", daemon=True)
    thread.start()
    return thread


def device_context(cl, info: dict, device) -> Any:
    """The process's one context of ``device`` (created on first use)."""
    key = (info["platform"], info["device"])
    with _LOCK:
        if key not in _CONTEXTS:
            _CONTEXTS[key] = cl.Context([device])
        return _CONTEXTS[key]
