"""``merge_nexus``: join the shard outputs of one job into one file and prove it complete."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AzfilterError
from ..fileio import commit_temporary, remove_quietly, temporary_path
from ..manifest import Manifest
from .meta import ROW_ARRAYS, OutputMeta, comparable, describe_sectors, same_sectors
from .nexus import NexusFile, OutputWriteError
from .read import (
    READ_ERRORS,
    as_text,
    find_process,
    missing_entries,
    nexus_layout,
    radial_axis_of,
    read_error,
    read_job_records,
    read_nexus_config,
    row_dataset,
    sector_ranges_of,
)
from .sparse import sparse_group_of

# NXparameters entries the writer adds itself (not reduction parameters).
_WRITER_INPUTS = ("operation", "wavelength", "poni")


def _read_shard(path: Path, order: int) -> dict[str, Any]:
    """What merge needs of one input (raises AzfilterError naming it when unreadable)."""
    import h5py

    if not path.is_file():
        raise AzfilterError(f"{path}: no such file")
    config = read_nexus_config(path)
    try:
        with h5py.File(path, "r") as h5:
            process = find_process(h5, path)
            shard = as_text(process["shard"][()]) if "shard" in process else None
            layout = nexus_layout(h5)
            inputs = process.get("input") if layout == "nxazint1d" else process.get("parameters")
            parameters = {k: _plain(v[()]) for k, v in inputs.items()
                          if k not in _WRITER_INPUTS} if inputs is not None else {}
            data = h5["entry/data"]
            axis, unit = radial_axis_of(data)
            mono = h5.get("entry/instrument/monochromator")
            wavelength = None
            if mono is not None and "wavelength" in mono:
                value = float(mono["wavelength"][()])
                wavelength = value * 1e-10 if np.isfinite(value) and value > 0 else None
            instrument = h5.get("entry/instrument")
            names = {}
            if instrument is not None:
                names["instrument_name"] = instrument.get("name")
                source = instrument.get("source")
                if source is not None:
                    for key in ("name", "type", "probe"):
                        names[f"source_{key}"] = source.get(key)
            info = dict(
                path=path, config=config, layout=layout,
                poni=as_text(process["poni/data"][()]),
                operation=as_text(process["operation"][()]),
                parameters=parameters, radial=axis[()], unit=unit,
                sectors=sector_ranges_of(data),
                arrays=[name for name, _a, _d in ROW_ARRAYS
                        if row_dataset(data, name, layout) is not None],
                rows=int(data["source"].shape[0]), order=order, wavelength=wavelength,
                names={k: as_text(v[()]) for k, v in names.items() if v is not None},
                records=read_job_records(h5),
                sparse=sparse_group_of(h5) is not None,
            )
    except AzfilterError:
        raise
    except READ_ERRORS as err:
        raise read_error(path, err) from None
    info["shard_index"], info["shard_count"] = None, None
    if shard:
        try:
            info["shard_index"], info["shard_count"] = (int(v) for v in shard.split("/"))
        except ValueError:
            raise AzfilterError(f"{path}: damaged: bad shard '{shard}'") from None
    return info


def _check_same_job(infos: list[dict[str, Any]]) -> None:
    """Refuse inputs of different jobs: options, bins, manifest digest, shard count N."""
    from ..config import result_signature

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
        if not same_sectors(info["sectors"], first["sectors"]):
            raise AzfilterError(
                f"{info['path']}: χ sectors differ from {first['path']} "
                f"({describe_sectors(info['sectors'])}, not {describe_sectors(first['sectors'])})")
    with_manifest = [i for i in infos if i["records"]["digest"]]
    if with_manifest and len(with_manifest) != len(infos):
        bare = next(i for i in infos if not i["records"]["digest"])
        raise AzfilterError(
            f"{bare['path']}: has no job manifest (an older azfilter) but "
            f"{with_manifest[0]['path']} has one: merge the shards of one run")
    for info in with_manifest[1:]:
        mine, theirs = with_manifest[0]["records"], info["records"]
        if mine["shards"] != theirs["shards"]:
            raise AzfilterError(
                f"{info['path']}: comes from a different job than {with_manifest[0]['path']} "
                f"(split into {theirs['shards']} shards, not {mine['shards']})")
        if mine["digest"] != theirs["digest"]:
            raise AzfilterError(
                f"{info['path']}: comes from a different job than {with_manifest[0]['path']} "
                f"(job manifests differ: {len(theirs['entries'])} planned frames vs "
                f"{len(mine['entries'])}, digest {theirs['digest'][:12]} vs "
                f"{mine['digest'][:12]})")
    counts = {i["shard_count"] for i in infos if i["shard_count"]}
    if len(counts) > 1:
        by_count = {i["shard_count"]: i["path"] for i in infos if i["shard_count"]}
        (n1, p1), (n2, p2) = sorted(by_count.items())[:2]
        raise AzfilterError(f"{p2}: comes from a different job than {p1} "
                            f"(shard of {n2}, not of {n1})")


def merge_nexus(inputs: Iterable[str | os.PathLike], output: str | os.PathLike,
                overwrite: bool = False, block_rows: int = 1024) -> dict[str, Any]:
    """Join shard outputs of one job into one NeXus file, in shard (= source/frame) order,
    and record whether the result is complete.

    Shards are ordered by their stored shard index ``I/N`` (files without one keep their
    command-line order, after the sharded ones); rows keep their order inside each file.
    A (source, frame) pair present in several inputs is written once. Failed frames of the
    inputs are carried into the output (``entry/azfilter/failed``). When the inputs store
    the job manifest, every planned frame must be a row or a failed frame: the output's
    ``entry/azfilter@complete`` says whether it is, and ``entry/azfilter/missing`` lists the
    planned frames (and shard indices) that are not.

    Returns
    -------
    dict
        ``rows`` written, ``duplicates`` dropped, ``missing_shards`` (shard indices absent
        when the inputs say how many shards there were), ``missing_frames`` (planned frames
        neither a row nor failed; 0 without a manifest), ``failed`` (failed frames recorded),
        ``complete`` (True/False; None when the inputs have no manifest and no shard is
        known missing).

    Raises
    ------
    AzfilterError
        One line naming the file: an input is missing, damaged or not an azfilter result;
        the inputs come from different jobs (options, bins, χ sectors, job manifest or shard
        count N differ); the output exists and ``overwrite`` is false.
    OutputWriteError
        The output cannot be written (disk full, read-only); nothing is left behind.
    """
    import h5py

    paths = [Path(p) for p in inputs]
    output = Path(output)
    if not paths:
        raise AzfilterError("merge: no input files")
    if output.exists() and not overwrite:
        raise AzfilterError(f"{output}: output exists; use --overwrite to replace it")
    if any(p.resolve() == output.resolve() for p in paths if p.exists()):
        raise AzfilterError(f"{output}: the output is also an input")
    infos = [_read_shard(path, order) for order, path in enumerate(paths)]
    _check_same_job(infos)
    first = infos[0]
    infos.sort(key=lambda i: (i["shard_index"] is None,
                              i["shard_index"] if i["shard_index"] is not None else 0,
                              i["order"]))
    records = first["records"]
    manifest = None
    if records["digest"]:
        manifest = Manifest(tuple(records["entries"]), records["shards"], records["digest"])
    count = manifest.shards if manifest is not None else next(
        (i["shard_count"] for i in infos if i["shard_count"]), None)
    missing_shards: list[int] = []
    if count:
        present = {i["shard_index"] for i in infos}
        missing_shards = [k for k in range(count) if k not in present]
    arrays = [name for name in first["arrays"] if all(name in i["arrays"] for i in infos)]
    sparse = [i["sparse"] for i in infos]
    if any(sparse) and not all(sparse):
        plain = next(i for i in infos if not i["sparse"])
        raise AzfilterError(f"{plain['path']}: holds no sparse frames, unlike "
                            f"{next(i for i in infos if i['sparse'])['path']}")
    config = dict(first["config"])
    config["output"] = str(output.resolve())
    config.pop("shard", None)
    meta = OutputMeta(operation=first["operation"], unit=first["unit"],
                      parameters=first["parameters"], poni_text=first["poni"], geometry=[],
                      config=config, manifest=manifest, wavelength=first["wavelength"],
                      sectors=first["sectors"],
                      **first["names"])
    try:
        tmp = temporary_path(output, make_folder=True)
    except OSError as err:
        raise OutputWriteError(output, err) from None
    seen: set[tuple[str, int]] = set()
    written = duplicates = 0
    out = None
    try:
        out = NexusFile.create(tmp, meta, first["radial"], arrays, name=output)
        merger = None
        if all(sparse):   # azfilter sparsify outputs: carry the sparse frames along
            from .sparse import SparseMerger

            opened = out
            merger = opened.guarded(lambda: SparseMerger(opened.h5, [i["path"] for i in infos]))
        for info in infos:
            try:
                with h5py.File(info["path"], "r") as h5:
                    data = h5["entry/data"]
                    datasets = {name: row_dataset(data, name, info["layout"]) for name in arrays}
                    for start in range(0, info["rows"], block_rows):
                        stop = min(info["rows"], start + block_rows)
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
                        block = {name: dset[start:stop][keep] for name, dset in datasets.items()}
                        out.append(block, [sources[k] for k in keep], [indices[k] for k in keep])
                        if merger is not None:
                            rows = [start + k for k in keep]
                            out.guarded(lambda rows=rows, h5=h5: merger.add(h5, rows))
                        written += len(keep)
            except (AzfilterError, OutputWriteError):
                raise
            except READ_ERRORS as err:
                raise read_error(info["path"], err) from None
        failures: dict[tuple[str, int], str] = {}
        for info in infos:
            for source, index, reason in info["records"]["failed"]:
                if (source, index) not in seen:
                    failures.setdefault((source, index), reason)
        failed = [(s, i, r) for (s, i), r in failures.items()]
        out.set_failures(failed)
        missing: list[tuple[str, int]] = []
        complete: bool | None = None
        if manifest is not None:
            out.set_manifest(manifest.entries, manifest.digest, manifest.shards)
            missing = missing_entries(manifest.entries, seen, set(failures))
            # A shard no input names is missing only when frames of it are: an unsharded
            # output, or an earlier merge, holds the frames of every shard.
            lost = set(missing)
            missing_shards = [k for k in missing_shards
                              if any(e in lost for e in manifest.shard_entries(k))]
            complete = not missing and not missing_shards
        elif missing_shards:
            complete = False
        out.set_completeness(complete, missing, missing_shards)
        file, out = out, None
        file.finish()
        commit_temporary(tmp, output, fsync=False)
    except OSError as err:
        if out is not None:
            out.close()
        remove_quietly(tmp)
        raise OutputWriteError(output, err) from None
    except BaseException:
        if out is not None:
            out.close()
        remove_quietly(tmp)
        raise
    return {"rows": written, "duplicates": duplicates, "missing_shards": missing_shards,
            "missing_frames": len(missing), "failed": len(failed), "complete": complete}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
