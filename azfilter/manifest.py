"""The job manifest: the planned list of (source, frame), frozen when a job is planned.

Every output of a job (each shard's file, the merged file) stores the whole job's manifest
and its hash, so that ``azfilter merge`` can prove a result complete: same job (same
manifest hash), every shard of N present, every planned frame present or listed as failed.
A glob expanded at different times by different tasks, or a directory that filled in
between, gives a different manifest, and merging such shards is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Manifest:
    """The frames a job plans, in order, and how they are split into shards.

    Attributes
    ----------
    entries : tuple of (str, int)
        (source, frame index) of every planned frame, in job order. A file that could not be
        counted while planning is one entry with frame index -1.
    shards : int
        N of ``--shard I/N`` (1 for an unsharded job).
    digest : str
        SHA-256 of the entries (hex); two manifests are the same job when digests agree.
    """

    entries: tuple[tuple[str, int], ...]
    shards: int = 1
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", manifest_digest(self.entries))

    @classmethod
    def of(cls, entries: Iterable[tuple[str, int]], shards: int = 1) -> Manifest:
        """A manifest from (source, frame) pairs."""
        return cls(tuple((str(s), int(i)) for s, i in entries), int(shards))

    def __len__(self) -> int:
        return len(self.entries)

    def shard_range(self, index: int) -> range:
        """Positions in :attr:`entries` that shard ``index`` of :attr:`shards` reduces."""
        total, count = len(self.entries), self.shards
        return range(index * total // count, (index + 1) * total // count)

    def shard_entries(self, index: int) -> Sequence[tuple[str, int]]:
        """The (source, frame) pairs of shard ``index``."""
        span = self.shard_range(index)
        return self.entries[span.start:span.stop]


def manifest_digest(entries: Iterable[tuple[str, int]]) -> str:
    """SHA-256 (hex) of (source, frame) pairs, independent of how they are stored."""
    digest = hashlib.sha256()
    for source, index in entries:
        digest.update(f"{source}\0{int(index)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
