"""How many cores this process may use, and whether the job runs as one task of many.

The cores follow what the scheduler or the user allowed, not the machine's size: the CPU
affinity mask (taskset, cgroups, SLURM's binding), capped by ``SLURM_CPUS_PER_TASK`` inside a
SLURM job. Reader/decoder pools and the compiled engine's threads size themselves from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def usable_cores(environ: Mapping[str, str] | None = None) -> int:
    """Cores this process may use (at least 1).

    The CPU affinity mask where the OS has one (else ``os.cpu_count()``), capped by
    ``SLURM_CPUS_PER_TASK`` when it is set to a positive integer.
    """
    environ = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.strip().isdigit() and int(slurm) > 0:
        cores = min(cores, int(slurm))
    return max(1, cores)
