"""Running the real launcher (``toy_launch.py`` = launch.py on the toy stages) as a user does, and
reading what it left: markers, job records, spans of shard runs, the driver record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOY_LAUNCH = HERE / "toy_launch.py"
LAUNCH = ROOT / "launch.py"


def toy_env(spec: dict) -> dict:
    env = dict(os.environ, TOY_PIPELINE=json.dumps(spec), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    return env


def toy_cmd(workdir: Path, cluster: str, *args: str) -> list:
    return [sys.executable, str(TOY_LAUNCH), "--workdir", str(workdir), "--cluster", cluster, *args]


def launch_cmd(*args: str) -> list:
    return [sys.executable, str(LAUNCH), *args]


def start(cmd: list, env: dict, log: Path) -> subprocess.Popen:
    """A launcher in a session of its own (as in a terminal of its own)."""
    f = open(log, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def run(cmd: list, env: Optional[dict] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env or dict(os.environ), cwd=ROOT, timeout=timeout)


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_text(path: Path, text: str, timeout: float) -> float:
    """The time ``text`` first appeared in the file ``path``."""
    def seen():
        try:
            return text in path.read_text(errors="replace")
        except FileNotFoundError:
            return False

    wait_for(seen, timeout, f"{text!r} in {path}", every=0.02)
    return time.time()


def state_dir(workdir: Path, stage: str = "toy", iteration=None) -> Path:
    scope = "once" if iteration is None else f"iter{iteration}"
    return Path(workdir) / ".pipeline" / "state" / scope / stage


def keys(workdir: Path, kind: str, stage: str = "toy", iteration=None) -> set:
    d = state_dir(workdir, stage, iteration)
    return {p.name[: -len(f".{kind}.json")] for p in d.glob(f"*.{kind}.json")} if d.is_dir() else set()


def running_now(workdir: Path, stage: str = "toy", iteration=None) -> set:
    return keys(workdir, "running", stage, iteration) - keys(workdir, "done", stage, iteration)


def runs(workdir: Path) -> list:
    p = Path(workdir) / "runs.log"
    return p.read_text().splitlines() if p.exists() else []


def all_job_ids(workdir: Path, stage: str = "toy", iteration=None) -> list:
    """(shard key, job id) of every submission ever recorded for a step (not only the latest)."""
    out = []
    for f in sorted((state_dir(workdir, stage, iteration) / "_jobs").glob("*.json")):
        rec = json.loads(f.read_text())
        out += [(k, str(j["job_id"])) for k, j in rec["jobs"].items()]
    return out


def job_records(workdir: Path, stage: str = "toy", iteration=None) -> list:
    out = []
    for f in sorted((state_dir(workdir, stage, iteration) / "_jobs").glob("*.json")):
        rec = json.loads(f.read_text())
        out += [{"executor": rec["executor"], **j} for j in rec["jobs"].values()]
    return out


def driver_record(workdir: Path) -> dict:
    p = Path(workdir) / ".pipeline" / "driver.json"
    return json.loads(p.read_text()) if p.exists() else {}


def status(workdir: Path) -> subprocess.CompletedProcess:
    return run(launch_cmd("status", "--workdir", str(workdir)), timeout=120)


def require_partitions(*names: str) -> None:
    """Fail (in CI) or skip when the local cluster lacks partitions of scripts/slurm_local.sh (a
    cluster started by an older version of it)."""
    import pytest

    from pipeline.scheduler import SlurmScheduler

    missing = [n for n in names if n not in SlurmScheduler().partitions()]
    if missing:
        msg = (f"the Slurm cluster has no partition {', '.join(missing)}: it was started by an older "
               f"scripts/slurm_local.sh (stop and start it again)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def sacct_spans(job_ids: list) -> dict:
    """{job id: (start, end)} in seconds since the epoch from sacct (every run of a requeued job)."""
    import datetime

    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", ",".join(bases), "-o", "JobID,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    spans: dict = {}

    def ts(text):
        if text in ("Unknown", "None", ""):
            return float("inf")
        return datetime.datetime.fromisoformat(text).timestamp()

    for line in out.splitlines():
        jid, start, end = line.split("|")
        if start in ("Unknown", "None"):
            continue
        spans.setdefault(jid, []).append((ts(start), ts(end)))
    return spans


def shard_overlaps_in_sacct(workdir: Path, stage: str = "toy", iteration=None) -> list:
    """Pairs of jobs of one shard whose runs overlapped in time, as sacct recorded them."""
    by_shard: dict = {}
    pairs = all_job_ids(workdir, stage, iteration)
    spans = sacct_spans([j for _, j in pairs])
    for key, job in pairs:
        for span in spans.get(job, []):
            by_shard.setdefault(key, []).append((*span, job))
    bad = []
    for key, runs_ in by_shard.items():
        runs_.sort()
        for a, b in zip(runs_, runs_[1:]):
            if a[2] != b[2] and b[0] < a[1]:
                bad.append((key, a, b))
    return bad


def squeue_tagged(workdir: Path) -> list:
    from pipeline.executors import workdir_tag
    from pipeline.scheduler import SlurmScheduler

    return sorted(SlurmScheduler().jobs_named(f"-{workdir_tag(workdir)}"))


def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` at ``path`` (a small disk to fill up); skipped without root, a
    failure in CI (which runs as root)."""
    import shutil

    import pytest

    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs at {path} (CI runs as root)")
        pytest.skip("needs root to mount a small tmpfs")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
