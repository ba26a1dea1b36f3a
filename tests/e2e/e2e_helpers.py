"""Helpers of the end-to-end tests: launch the pipeline as a user does (``python launch.py``) on the
sample corpus with the smoke preset, watch training, kill its ranks, read what the run left."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
STAGES_PER_ITERATION = ("features", "kmeans", "labels", "train")


# fine-tuning has its own tests; the pretraining chain is what these runs are about
E2E_OVERRIDES = ("finetune.enabled=false",)


def launch_cmd(workdir: Path, corpus: Path, cluster: str, *args: str) -> List[str]:
    return [PYTHON, str(REPO_ROOT / "launch.py"), "--preset", "smoke", "--cluster", cluster,
            "--workdir", str(workdir), "--corpus", str(corpus), *args, *E2E_OVERRIDES]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "2")
    e["PYTHONUNBUFFERED"] = "1"
    return e


@dataclass
class Launch:
    cmd: List[str]
    returncode: Optional[int] = None
    output: str = ""
    seconds: float = 0.0
    log: Optional[Path] = None

    def __str__(self) -> str:
        tail = "\n".join(self.output.splitlines()[-60:])
        return f"$ {' '.join(self.cmd)}\n-> rc {self.returncode} in {self.seconds:.0f} s\n{tail}"


def run_launch(cmd: List[str], log: Path, timeout: float) -> Launch:
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO_ROOT,
                              timeout=timeout)
    return Launch(cmd, proc.returncode, log.read_text(errors="replace"), time.time() - start, log)


def start_launch(cmd: List[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO_ROOT,
                            start_new_session=True)


def wait_for_updates(checkpoint: Path, at_least: int, proc: Optional[subprocess.Popen],
                     timeout: float) -> int:
    """Poll a fairseq checkpoint until its update count reaches ``at_least``."""
    from stages.fairseq_run import checkpoint_updates

    deadline = time.time() + timeout
    while time.time() < deadline:
        updates = checkpoint_updates(checkpoint)
        if updates is not None and updates >= at_least:
            return updates
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited (rc {proc.returncode}) before {checkpoint} "
                                 f"reached {at_least} updates")
        time.sleep(0.3)
    raise AssertionError(f"{checkpoint} did not reach {at_least} updates within {timeout:.0f} s")


def rank_processes(root_pid: int) -> list:
    """The submitit task processes (one per rank) among the descendants of ``root_pid``."""
    import psutil

    out = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "submitit.core._submit" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def sigkill(processes) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone
            pass


def events_first_steps(logdir: Path) -> list:
    """First ``loss`` step of each TensorBoard events file of a log dir, in creation order."""
    from stages.tensorboard import events_files, read_scalars_file

    firsts = []
    for path in events_files(logdir):
        steps = [s for s, *_ in read_scalars_file(path).get("loss", [])]
        if steps:
            firsts.append(min(steps))
    return firsts


STAGE_LINE = re.compile(r"^\[(?P<step>[^\]]+)\] complete: (?P<n>\d+) shard\(s\), (?P<run>\d+) run now, "
                        r"(?P<s>[\d.]+)s", re.M)


def stage_wall_times(*launches: "Launch") -> dict:
    """``{"train (iteration 1)": seconds, ...}`` for every step that ran shards, from the
    launcher's ``[step] complete: ...`` lines (a later launch that ran it again wins)."""
    out = {}
    for launch in launches:
        for m in STAGE_LINE.finditer(launch.output):
            if int(m.group("run")) > 0:
                out[m.group("step")] = float(m.group("s"))
    return out


def submitted_steps(launch: "Launch") -> list:
    return re.findall(r"^\[([^\]]+)\] submitting", launch.output, re.M)


def read_done_stats(workdir: Path, stage: str, iteration, key: str) -> dict:
    from pipeline.state import StateStore

    marker = StateStore(Path(workdir)).read_done(stage, iteration, key) or {}
    return marker.get("stats", {})


def tree(workdir: Path, iteration: int) -> set:
    return {p.name for p in (Path(workdir) / f"iter{iteration}").iterdir()}


def kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything under it (cleanup after a failed test)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    sigkill(root.children(recursive=True) + [root])


def running_job_id(workdir: Path, stage: str, iteration, key: str) -> Optional[str]:
    """The Slurm job id (``<array>_<task>``) the engine recorded for a running shard of this work
    dir (its ``.running.json`` marker), so a test signals its own job and nobody else's."""
    from pipeline.state import StateStore

    path = StateStore(Path(workdir)).stage_state_dir(stage, iteration) / f"{key}.running.json"
    try:
        import json

        return str(json.loads(path.read_text())["job_id"])
    except (OSError, ValueError, KeyError):
        return None
