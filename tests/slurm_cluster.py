"""A one-node SLURM cluster for the tests: found when one answers, else started when root.

:func:`cluster_session` (the body of the session fixture ``slurm`` of the SLURM tests)
yields a :class:`SlurmCluster` whose :attr:`env` runs ``sbatch``, ``squeue``, ``scontrol`` ...
against it. It uses, in this order:

1. the cluster of the environment (``$SLURM_CONF`` or ``/etc/slurm/slurm.conf``) when ``sinfo``
   answers with an idle node that is this machine (the tests' files must be visible to the
   jobs, so a multi-node site cluster is not used);
2. the cluster ``.ci/slurm-start`` keeps in :data:`CLUSTER_DIR` when it is running;
3. a cluster started now with ``.ci/slurm-start`` (root only), stopped at the end of the session.

When none of these works the tests skip with the reason, except in CI (``CI=true``), where they
fail: CI installs the packages (``.ci/slurm-start install``) and must run them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START_SCRIPT = REPO / ".ci" / "slurm-start"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: where ``.ci/slurm-start`` keeps the test cluster's configuration, state and logs
CLUSTER_DIR = Path(os.environ.get("AZFILTER_SLURM_DIR", "/tmp/azfilter-slurm"))

#: node states in which a node runs jobs
USABLE_STATES = ("idle", "mix", "alloc", "comp")


@dataclass
class JobState:
    """What ``scontrol show job`` says of one job or array task."""

    job_id: str
    state: str
    exit_code: int
    signal: int
    reason: str


@dataclass
class SlurmCluster:
    """A running cluster and the environment that reaches it.

    Attributes
    ----------
    env : dict
        Environment for the SLURM commands and the jobs (``SLURM_CONF`` when needed; ``PATH``
        starts with the folder of the running Python, so jobs find this ``azfilter``).
    started : bool
        True when this session started the cluster (and stops it at the end).
    """

    env: dict[str, str]
    started: bool = False
    description: str = ""
    _log: list[str] = field(default_factory=list)

    def run(self, *args: str | os.PathLike, check: bool = True, timeout: float = 60,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a command in the cluster's environment; its stdout/stderr as text."""
        result = subprocess.run([os.fspath(a) for a in args], env=self.env, cwd=cwd,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str:
        """``sbatch --parsable ARGS``: the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def states(self, job_id: str) -> list[JobState]:
        """The state of a job, or of each task of an array job (``scontrol show job``)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        states = []
        for line in result.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobState" not in fields:
                continue
            task = fields.get("ArrayTaskId")
            name = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
            code, _, signal = fields.get("ExitCode", "0:0").partition(":")
            states.append(JobState(name, fields["JobState"], int(code), int(signal or 0),
                                   fields.get("Reason", "")))
        return states

    def wait(self, *job_ids: str, timeout: float = 120) -> list[JobState]:
        """Wait until none of the jobs (arrays included) is pending or running; their states."""
        deadline = time.monotonic() + timeout
        ids = ",".join(job_ids)
        while True:
            queued = self.run("squeue", "-h", "-j", ids, "-o", "%i %T %r", check=False)
            if queued.returncode == 0 and not queued.stdout.strip():
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs {ids} still queued after {timeout:.0f} s:\n"
                                     f"{queued.stdout}{queued.stderr}")
            time.sleep(0.3)
        return [state for job in job_ids for state in self.states(job)]


def _node_status(env: dict[str, str]) -> tuple[bool, str]:
    """(usable, why): sinfo answers with a usable node that is this machine."""
    if shutil.which("sinfo", path=env.get("PATH")) is None:
        return False, "sinfo not found (apt-get install slurm-client)"
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                                capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False, "sinfo does not answer within 15 s"
    if result.returncode != 0:
        return False, f"sinfo: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    nodes = [line.split() for line in result.stdout.splitlines() if line.strip()]
    here = {socket.gethostname().split(".")[0], "localhost"}
    mine = [(name, state) for name, state in nodes if name in here]
    if not mine or len({name for name, _ in nodes}) > 1:
        return False, f"not a one-node cluster on this machine (nodes: {nodes})"
    if not any(state.rstrip("*~#$@^-") in USABLE_STATES for _name, state in mine):
        return False, f"node not usable: {mine}"
    return True, f"node {mine[0][0]} {mine[0][1]}"


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    # The jobs run this interpreter's azfilter (the virtual environment's bin folder).
    paths = [str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"]
    env["PATH"] = os.pathsep.join(p for p in paths if p)
    for key in list(env):
        # a test session started inside a SLURM job must not pass its job's variables on
        if key.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and key != "SLURM_CONF":
            del env[key]
    return env


def find_or_start_cluster() -> tuple[SlurmCluster | None, str]:
    """A usable cluster (see the module docstring), or None and why not."""
    reasons = []
    env = _base_env()
    ok, why = _node_status(env)
    if ok:
        return SlurmCluster(env, description=f"existing cluster ({why})"), ""
    reasons.append(f"environment's cluster: {why}")
    conf = CLUSTER_DIR / "slurm.conf"
    if conf.is_file():
        ours = dict(env, SLURM_CONF=str(conf))
        ok, why = _node_status(ours)
        if ok:
            return SlurmCluster(ours, description=f"cluster of {CLUSTER_DIR} ({why})"), ""
        reasons.append(f"cluster of {CLUSTER_DIR}: {why}")
    if os.geteuid() != 0:
        reasons.append("not root, so .ci/slurm-start cannot start one")
        return None, "; ".join(reasons)
    try:
        result = subprocess.run([str(START_SCRIPT), "start", str(CLUSTER_DIR)], env=env,
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None, "; ".join(reasons + [".ci/slurm-start did not finish within 120 s"])
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-6:]
        return None, "; ".join(reasons + [".ci/slurm-start failed: " + " | ".join(tail)])
    ours = dict(env, SLURM_CONF=str(conf))
    ok, why = _node_status(ours)
    if not ok:
        return None, "; ".join(reasons + [f"started, but {why}"])
    return SlurmCluster(ours, started=True, description=f"started in {CLUSTER_DIR}"), ""


def stop_cluster() -> None:
    """Stop the daemons ``.ci/slurm-start`` started in :data:`CLUSTER_DIR`."""
    subprocess.run([str(START_SCRIPT), "stop", str(CLUSTER_DIR)], capture_output=True,
                   timeout=60, check=False)


def cluster_session() -> Iterator[SlurmCluster]:
    """Body of the session fixture ``slurm``: a running one-node SLURM cluster (skips
    without one, fails in CI), stopped afterwards when this session started it."""
    cluster, reason = find_or_start_cluster()
    if cluster is None:
        reason = f"no usable SLURM cluster: {reason}"
        if IN_CI:
            pytest.fail(reason + "; CI must run the SLURM tests (.ci/slurm-start install)")
        pytest.skip(reason)
    yield cluster
    if cluster.started:
        stop_cluster()
