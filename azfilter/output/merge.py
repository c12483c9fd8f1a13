from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AzfilterError
from ..fileio import new_file_mode, temporary_path
from .meta import ROW_ARRAYS, OutputMeta, comparable
from .nexus import NexusFile
from .read import as_text, find_process, read_nexus_config

# ---------------------------------------------------------------------------- merge


def merge_nexus(inputs: Iterable[str | os.PathLike], output: str | os.PathLike,
                overwrite: bool = False, block_rows: int = 1024) -> dict[str, Any]:
    """Join shard outputs of one job into one NeXus file, in shard (= source/frame) order.

    Shards are ordered by their stored shard index ``I/N`` (files without one keep their
    command-line order, after the sharded ones); rows keep their order inside each file.
    A (source, frame) pair present in several inputs is written once.

    Returns
    -------
    dict
        ``rows`` written, ``duplicates`` dropped, ``missing_shards`` (shard indices absent
        when the inputs say how many shards there were).

    Raises
    ------
    AzfilterError
        When an input is not an azfilter result, the inputs come from different jobs or have
        different bins, or the output exists and ``overwrite`` is false.
    """
    import h5py

    from ..config import result_signature

    paths = [Path(p) for p in inputs]
    output = Path(output)
    if not paths:
        raise AzfilterError("merge: no input files")
    if output.exists() and not overwrite:
        raise AzfilterError(f"{output}: output exists; use --overwrite to replace it")
    if any(p.resolve() == output.resolve() for p in paths if p.exists()):
        raise AzfilterError(f"{output}: the output is also an input")
    infos = []
    for order, path in enumerate(paths):
        if not path.is_file():
            raise AzfilterError(f"{path}: no such file")
        config = read_nexus_config(path)
        with h5py.File(path, "r") as h5:
            process = find_process(h5, path)
            shard = as_text(process["shard"][()]) if "shard" in process else None
            poni_text = as_text(process["poni/data"][()])
            operation = as_text(process["operation"][()])
            parameters = {k: _plain(v[()]) for k, v in process["parameters"].items()} \
                if "parameters" in process else {}
            data = h5["entry/data"]
            radial_name = as_text(data.attrs["axes"][-1])
            radial = data[radial_name][()]
            unit = as_text(data[radial_name].attrs.get("unit_name", "q_nm^-1"))
            arrays = [name for name, _a, _d in ROW_ARRAYS if name in data]
        shard_index, shard_count = (None, None)
        if shard:
            shard_index, shard_count = (int(v) for v in shard.split("/"))
        infos.append(dict(path=path, config=config, shard_index=shard_index,
                          shard_count=shard_count, poni=poni_text, operation=operation,
                          parameters=parameters, radial=radial, unit=unit, arrays=arrays,
                          order=order))
    first = infos[0]
    signature = result_signature(first["config"])
    for info in infos[1:]:
        other = result_signature(info["config"])
        differ = sorted(k for k in set(signature) | set(other)
                        if comparable(signature.get(k)) != comparable(other.get(k)))
        if differ:
            raise AzfilterError(
                f"{info['path']}: comes from a different job than {first['path']} "
                f"({', '.join(differ)} differ)"
            )
        if info["radial"].shape != first["radial"].shape or not np.allclose(
                info["radial"], first["radial"], rtol=1e-12, atol=0):
            raise AzfilterError(f"{info['path']}: radial bins differ from {first['path']}")
    infos.sort(key=lambda i: (i["shard_index"] is None,
                              i["shard_index"] if i["shard_index"] is not None else 0,
                              i["order"]))
    missing: list[int] = []
    counts = {i["shard_count"] for i in infos if i["shard_count"]}
    if len(counts) == 1:
        count = counts.pop()
        present = {i["shard_index"] for i in infos}
        missing = [k for k in range(count) if k not in present]
    arrays = [name for name in first["arrays"] if all(name in i["arrays"] for i in infos)]
    config = dict(first["config"])
    config["output"] = str(output.resolve())
    meta = OutputMeta(operation=first["operation"], unit=first["unit"],
                      parameters=first["parameters"], poni_text=first["poni"], geometry=[],
                      config=config)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output, make_folder=True)
    seen: set[tuple[str, int]] = set()
    written = duplicates = 0
    out = None
    try:
        out = NexusFile.create(tmp, meta, first["radial"], arrays)
        for info in infos:
            with h5py.File(info["path"], "r") as h5:
                data = h5["entry/data"]
                n_rows = data["source"].shape[0]
                for start in range(0, n_rows, block_rows):
                    stop = min(n_rows, start + block_rows)
                    sources = [as_text(s) for s in data["source"][start:stop]]
                    indices = [int(i) for i in data["frame_index"][start:stop]]
                    keep = []
                    for k, key in enumerate(zip(sources, indices, strict=True)):
                        if key in seen:
                            duplicates += 1
                        else:
                            seen.add(key)
                            keep.append(k)
                    if not keep:
                        continue
                    block = {name: data[name][start:stop][keep] for name in arrays}
                    out.append(block, [sources[k] for k in keep], [indices[k] for k in keep])
                    written += len(keep)
        out.finish()
        out = None
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, output)
    except BaseException:
        if out is not None:
            out.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"rows": written, "duplicates": duplicates, "missing_shards": missing}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value

