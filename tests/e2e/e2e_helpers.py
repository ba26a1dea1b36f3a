"""Helpers of the end-to-end tests: launch the pipeline as a user does (``python launch.py``) on the
sample corpus with the smoke preset, watch training, kill its ranks, read what the run left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
STAGES_PER_ITERATION = ("features", "kmeans", "labels", "train")


def launch_cmd(workdir: Path, corpus: Path, cluster: str, *args: str, extra: tuple = ()) -> List[str]:
    return [PYTHON, str(REPO_ROOT / "launch.py"), "--preset", "smoke", "--cluster", cluster,
            *args, f"workdir={workdir}", f"corpus={corpus}", *extra]


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
    from stages.train import checkpoint_updates

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
    from stages.train import events_files, read_scalars_file

    firsts = []
    for path in events_files(logdir):
        steps = [s for s, *_ in read_scalars_file(path).get("loss", [])]
        if steps:
            firsts.append(min(steps))
    return firsts
