"""The on-disk cache: size bound, least-recently-used trimming, info, clear, the command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from azfilter import cache
from azfilter.commands.cache import cache_command, human_size
from azfilter.errors import AzfilterError

KIB = 1024
ENTRY_BYTES = 64 * KIB  # payload of the entries made here (a float64 array of 8192 values)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A private cache folder, the default bound, no process-wide bound."""
    path = tmp_path / "cache"
    monkeypatch.setenv("AZFILTER_CACHE_DIR", str(path))
    monkeypatch.delenv("AZFILTER_CACHE_MAX", raising=False)
    cache.set_cache_limit()
    yield path
    cache.set_cache_limit()


def store(folder: Path, name: str, value: float = 0.0) -> Path:
    path = folder / f"{name}.npz"
    assert cache.store_npz(path, data=np.full(ENTRY_BYTES // 8, value))
    return path


def set_age(path: Path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


def entry_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def total_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.npz"))


# ---------------------------------------------------------------------------- the bound
def test_parse_size():
    assert cache.parse_size("2G") == 2 * 1024**3
    assert cache.parse_size("2g") == 2 * 1024**3
    assert cache.parse_size("500MiB") == 500 * 1024**2
    assert cache.parse_size(" 1.5GB ") == 1_500_000_000
    assert cache.parse_size("64k") == 65536
    assert cache.parse_size("123") == 123
    assert cache.parse_size(4096) == 4096
    for unbounded in ("unlimited", "inf", "None", None, float("inf")):
        assert cache.parse_size(unbounded) is None
    for bad in ("abc", "-1", "0", "5X", "1.5.2G", "", True, 0.5):
        with pytest.raises(AzfilterError) as err:
            cache.parse_size(bad)
        assert str(err.value).startswith("AZFILTER_CACHE_MAX: ") and "\n" not in str(err.value)


def test_limit_from_default_environment_function_and_argument(folder, monkeypatch):
    assert cache.cache_limit() == cache.DEFAULT_MAX_BYTES == 2 * 1024**3
    monkeypatch.setenv("AZFILTER_CACHE_MAX", "300M")
    assert cache.cache_limit() == 300 * 1024**2
    cache.set_cache_limit("1G")  # the process-wide setting wins over the environment
    assert cache.cache_limit() == 1024**3
    assert cache.cache_limit("10K") == 10 * KIB  # an explicit argument wins over both
    assert cache.cache_limit(None) is None
    cache.set_cache_limit()
    assert cache.cache_limit() == 300 * 1024**2
    monkeypatch.setenv("AZFILTER_CACHE_MAX", "lots")
    with pytest.raises(AzfilterError, match="AZFILTER_CACHE_MAX: cannot read 'lots'"):
        cache.cache_limit()


def test_least_recently_used_entries_go_first(folder):
    paths = [store(folder, f"e{k}") for k in range(5)]
    for k, path in enumerate(paths):  # e0 is the oldest, e4 the newest
        set_age(path, 1000 - 100 * k)
    # a hit makes e1 the most recently used
    with cache.open_npz(paths[1]) as stored:
        assert stored["data"].shape == (ENTRY_BYTES // 8,)
    assert paths[1].stat().st_mtime > time.time() - 60
    entry_size = paths[0].stat().st_size
    # room for 4 entries: storing a sixth removes the two least recently used, e0 and e2
    cache.set_cache_limit(4 * entry_size + entry_size // 2)
    store(folder, "e5")
    assert entry_names(folder) == ["e1.npz", "e3.npz", "e4.npz", "e5.npz"]
    assert total_bytes(folder) <= cache.cache_limit()


def test_bound_is_respected_after_every_store(folder):
    cache.set_cache_limit(5 * ENTRY_BYTES)  # a little under 5 entries with the npz overhead
    for k in range(15):
        store(folder, f"e{k:02d}", value=k)
        assert total_bytes(folder) <= 5 * ENTRY_BYTES
        assert (folder / f"e{k:02d}.npz").is_file()  # the entry just stored stays
    # the newest entries are kept, whole
    kept = entry_names(folder)
    assert kept == [f"e{k:02d}.npz" for k in range(11, 15)]
    for name in kept:
        with np.load(folder / name) as stored:
            assert np.all(stored["data"] == int(name[1:3]))


def test_trim_cache_function(folder):
    for k in range(4):
        set_age(store(folder, f"e{k}"), 100 - k)
    removed = cache.trim_cache(2.5 * ENTRY_BYTES)
    assert [p.name for p in removed] == ["e0.npz", "e1.npz"]
    assert cache.trim_cache(None) == []  # no bound: nothing to do
    assert entry_names(folder) == ["e2.npz", "e3.npz"]


def test_entry_larger_than_the_bound_is_not_stored(folder, caplog, monkeypatch):
    monkeypatch.setattr(cache, "_warned_too_large", False)
    cache.set_cache_limit(ENTRY_BYTES // 2)
    with caplog.at_level(logging.WARNING, logger="azfilter.cache"):
        assert not cache.store_npz(folder / "big.npz", data=np.zeros(ENTRY_BYTES // 8))
    assert not (folder / "big.npz").exists()
    assert "over the cache bound" in caplog.text


def test_bad_environment_bound_never_fails_a_store(folder, monkeypatch, caplog):
    monkeypatch.setenv("AZFILTER_CACHE_MAX", "-3")
    with caplog.at_level(logging.WARNING, logger="azfilter.cache"):
        store(folder, "e0")
    assert "AZFILTER_CACHE_MAX" in caplog.text and "using 2147483648 bytes" in caplog.text


def test_files_being_written_are_never_removed(folder):
    store(folder, "e0")
    fresh = folder / ".csr-abc.12345.tmp"  # a store in progress in another process
    fresh.write_bytes(b"x" * 1000)
    stale = folder / ".csr-def.67890.tmp"  # left by a killed process
    stale.write_bytes(b"x" * 1000)
    set_age(stale, 2 * cache.STALE_TEMPORARY_SECONDS)
    cache.trim_cache(1)  # keep (almost) nothing
    assert entry_names(folder) == [fresh.name]
    cache.clear_cache()
    assert entry_names(folder) == [fresh.name]
    assert cache.cache_info()["entries"] == 0 and cache.cache_info()["bytes"] == 0


def test_temporaries_of_dead_processes_are_removed_live_ones_kept(folder):
    from azfilter.fileio import temporary_path, temporary_prefix

    store(folder, "e0")
    live = temporary_path(folder / "e1.npz")  # this process is writing e1.npz
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(done.stdout)  # a process that has exited
    prefix = temporary_prefix(folder / "e2.npz").replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    dead = folder / f"{prefix}abc.tmp"
    dead.write_bytes(b"partial")
    cache.trim_cache()
    assert live.exists() and not dead.exists()
    assert cache.cache_info()["entries"] == 1


def test_files_vanishing_under_trim_are_tolerated(folder, monkeypatch):
    for k in range(3):
        set_age(store(folder, f"e{k}"), 100 - k)
    real_scan = cache._scan

    def scan_then_lose_e0(directory):
        entries, temporaries = real_scan(directory)
        (folder / "e0.npz").unlink()  # another process removes it after our listing
        return entries, temporaries

    monkeypatch.setattr(cache, "_scan", scan_then_lose_e0)
    removed = cache.trim_cache(int(1.5 * ENTRY_BYTES))
    # e0 counted as gone; only e1 had to be deleted here
    assert [p.name for p in removed] == ["e1.npz"]
    assert entry_names(folder) == ["e2.npz"]


def test_opening_a_missing_entry_is_a_miss(folder):
    with pytest.raises(FileNotFoundError):
        cache.open_npz(folder / "absent.npz")


def test_table_and_factor_hits_mark_entries_used(folder):
    from synthetic import default_geometry

    from azfilter.binning import build_csr
    from azfilter.preproc import geometric_factors

    geometry = default_geometry("small")
    mask = np.array(geometry.detector.mask, dtype=bool)
    stats: dict = {}
    build_csr(geometry, "q_nm^-1", 100, "no", mask, stats=stats)
    geometric_factors(geometry, geometry.detector.shape, (0.99, 0.0), True)
    entries = sorted(folder.glob("*.npz"))
    assert len(entries) == 2
    for path in entries:
        set_age(path, 3600)
    build_csr(geometry, "q_nm^-1", 100, "no", mask, stats=stats)
    assert stats["cache"] == "hit"
    geometric_factors(geometry, geometry.detector.shape, (0.99, 0.0), True)
    for path in entries:
        assert path.stat().st_mtime > time.time() - 60, path.name


# ---------------------------------------------------------------------------- processes
WORKER = textwrap.dedent("""
    import random, sys, time
    import numpy as np
    from pathlib import Path
    from azfilter import cache

    folder, tag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rng = random.Random(tag)
    # start together: each says it is ready, then waits for the other
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / f"ready-{tag}").touch()
    deadline = time.monotonic() + 60
    while len(list(folder.parent.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    reads = misses = 0
    for k in range(count):
        value = hash((tag, k)) % 1000
        assert cache.store_npz(folder / f"{tag}-{k:03d}-{value}.npz",
                               data=np.full(8192, float(value)))
        # read a few entries of either process: present ones must be whole
        for path in rng.sample(sorted(folder.glob("*.npz")), 2) if k > 2 else []:
            try:
                with cache.open_npz(path) as stored:
                    data = stored["data"]
                expected = float(path.stem.rsplit("-", 1)[1])
                assert data.shape == (8192,) and np.all(data == expected), path
                reads += 1
            except FileNotFoundError:  # trimmed by the other process: a miss
                misses += 1
    print(reads, misses)
""")


def test_two_processes_filling_one_cache(tmp_path):
    """Two processes store 40 entries each, and read each other's, under a 10-entry bound."""
    folder = tmp_path / "shared-cache"
    limit = 10 * ENTRY_BYTES
    env = {**os.environ, "AZFILTER_CACHE_DIR": str(folder), "AZFILTER_CACHE_MAX": str(limit),
           "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(folder), tag, "40"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for tag in ("a", "b")]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        reads, _misses = (int(n) for n in out.split())
        assert reads > 0
    names = entry_names(folder)
    assert not [name for name in names if not name.endswith(".npz")]  # no temporaries left
    assert total_bytes(folder) <= limit
    assert 5 <= len(names) <= 10
    for name in names:  # every survivor is whole
        with np.load(folder / name) as stored:
            assert np.all(stored["data"] == float(name[:-4].rsplit("-", 1)[1]))
    # the last trim of all kept the entry its process had just stored (the other process's
    # last entry may have become the least recently used by then, and gone)
    assert any(name.startswith(("a-039-", "b-039-")) for name in names), names


# ---------------------------------------------------------------------------- info, clear
def test_cache_info_and_clear(folder, monkeypatch):
    assert cache.cache_info() == {"path": str(folder), "entries": 0, "bytes": 0,
                                  "limit": cache.DEFAULT_MAX_BYTES}
    paths = [store(folder, f"e{k}") for k in range(3)]
    size = sum(p.stat().st_size for p in paths)
    info = cache.cache_info()
    assert (info["entries"], info["bytes"]) == (3, size)
    assert cache.cache_info(max_bytes="1G")["limit"] == 1024**3
    assert cache.clear_cache() == {"path": str(folder), "entries": 3, "bytes": size}
    assert cache.cache_info()["entries"] == 0 and folder.is_dir()
    monkeypatch.setenv("AZFILTER_CACHE_DIR", "off")
    assert cache.cache_info()["path"] is None
    assert cache.clear_cache() == {"path": None, "entries": 0, "bytes": 0}


def test_human_size():
    assert human_size(0) == "0 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(2 * 1024**3) == "2.0 GiB"
    assert human_size(None) == "unlimited"


def test_cache_command(folder, monkeypatch):
    runner = CliRunner()
    for k in range(2):
        store(folder, f"e{k}")
    size = total_bytes(folder)
    done = runner.invoke(cache_command, ["info"])
    assert done.exit_code == 0, done.output
    assert f"cache:   {folder}" in done.output and "entries: 2" in done.output
    assert f"({size} bytes)" in done.output and "limit:   2.0 GiB (default)" in done.output
    monkeypatch.setenv("AZFILTER_CACHE_MAX", "500M")
    done = runner.invoke(cache_command, ["info", "--json"])
    assert json.loads(done.output) == {"path": str(folder), "entries": 2, "bytes": size,
                                       "limit": 500 * 1024**2}
    done = runner.invoke(cache_command, ["clear"])
    assert done.exit_code == 0
    assert done.output.strip() == f"removed 2 entries ({human_size(size)}) from {folder}"
    assert list(folder.glob("*.npz")) == []
    monkeypatch.setenv("AZFILTER_CACHE_MAX", "big")
    done = runner.invoke(cache_command, ["info"])
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [
        "azfilter: error: AZFILTER_CACHE_MAX: cannot read 'big' as a size (examples: 2G, "
        "500MiB, 1.5GB, unlimited)"]
    monkeypatch.delenv("AZFILTER_CACHE_MAX")
    monkeypatch.setenv("AZFILTER_CACHE_DIR", "off")
    assert runner.invoke(cache_command, ["info"]).output.startswith("cache: off")
    assert "nothing to clear" in runner.invoke(cache_command, ["clear"]).output


def test_deferred_stores_are_complete_when_the_command_returns(folder, tmp_path):
    """The command writes a new table and its correction factors on background threads
    (cache.defer_stores) while it reduces; when it returns, both entries are complete and
    reused by the next run, and stores are synchronous again for library callers."""
    from test_cli import PONI, invoke, make_frame, write_cbf

    poni = tmp_path / "geo.poni"
    poni.write_text(PONI)
    frames = [write_cbf(tmp_path / f"img_{k}.cbf", make_frame(k)) for k in range(2)]
    first = invoke("sigma-clip", "-p", poni, "--npt", 50, "--polarization", 0.99,
                   "--backend", "python", *frames, "-o", tmp_path / "a.h5")
    assert first.exit_code == 0, first.output
    entries = sorted(p.name.split("-")[0] for p in folder.glob("*.npz"))
    assert entries == ["csr", "factors"]
    for path in folder.glob("*.npz"):
        with cache.open_npz(path) as stored:
            assert len(stored.files) >= 2
    assert not cache._deferring and not cache._background
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    second = invoke("sigma-clip", "-p", poni, "--npt", 50, "--polarization", 0.99,
                    "--backend", "python", *frames, "-o", tmp_path / "b.h5")
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in folder.glob("*.npz")) == sorted(stamps)   # hits, no new


def test_store_soon_is_synchronous_unless_deferred(folder):
    path = folder / "soon.npz"
    assert cache.store_soon(path, data=np.arange(10.0))
    assert path.exists()                                  # at once
    cache.defer_stores()
    try:
        later = folder / "later.npz"
        assert cache.store_soon(later, data=np.arange(5.0))
        cache.wait_for_stores()
        with cache.open_npz(later) as stored:
            assert stored["data"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    finally:
        cache.defer_stores(False)
