"""The application's view of a run (AV-HuBERT's run report) refreshed after every step that
completes, without ever slowing the run.

A launch of five iterations runs for weeks; a view written only when the launch ends shows
nothing new all that time. ``Application.refresh_command`` names the application's own
subcommand that rewrites its view from the work dir (``launch.py report``); the launcher runs it
in a child process of its own session after each step that completed:

- starting it is all the scheduling loop waits for (a fork and exec), never its work; it runs
  at the lowest CPU priority (nice 19: the local executor's jobs share this machine's cores) and
  first in line for the OOM killer (``oom_score_adj`` 1000: a Slurm driver job's memory limit
  holds the driver and its refresh, and the driver must be the one that survives);
- at most one runs at a time: a step that ends while the last refresh still runs starts none
  (the next step's end, or the end-of-launch hook, writes a newer view anyway);
- a step that runs for days gets one too, while its jobs run: when ``cluster.view_refresh_s``
  passed since the last one started (``refresh_if_due``, called from the wait loop);
- its output goes to ``.pipeline/logs/refresh.log``; a refresh that fails is one warning line
  in the launch's output (the driver log when detached), never the launch's outcome;
- when the launch ends, a refresh still running is stopped (its process group, SIGTERM, then
  SIGKILL after ``STOP_WAIT_S``): the end-of-launch hook writes the final view, and an older one
  must not land after it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

log = logging.getLogger("pipeline")

STOP_WAIT_S = 10.0


def refresh_log(workdir: Path) -> Path:
    return Path(workdir) / ".pipeline" / "logs" / "refresh.log"


def _expendable(pid: int) -> None:
    """Make the refresh process yield the CPU to everything else and be the first one the OOM
    killer takes (both only lower its standing: no privilege needed). Set from here right after
    it started (no code between fork and exec); a failure only loses the preference."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError as e:  # not Linux, /proc not mounted, or it has ended already
        log.info("refresh %s: priority not lowered: %s", pid, e)


class BackgroundRefresh:
    def __init__(self, command: List[str], workdir: Path, echo: Callable[[str], None], every_s: float = 0.0):
        self.command = list(command)
        self.log = refresh_log(workdir)
        self.echo = echo
        self.every_s = float(every_s or 0)
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0
        self.skipped = 0
        self.last_start = time.monotonic()  # the launch's start counts as a fresh view's

    def refresh_if_due(self) -> bool:
        """While a step's jobs run: ``trigger`` when ``every_s`` passed since the last start."""
        if self.every_s <= 0 or time.monotonic() - self.last_start < self.every_s:
            return False
        self.last_start = time.monotonic()  # a skipped one (the last still runs) waits a period too
        return self.trigger()

    def trigger(self, *_why) -> bool:
        """Start a refresh unless one still runs; True when one was started. Never raises."""
        self._reap()
        if self.proc is not None:
            self.skipped += 1
            log.info("refresh skipped: the last one (pid %s) still runs", self.proc.pid)
            return False
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            _expendable(self.proc.pid)
        except OSError as e:
            self.echo(f"warning: the run's view was not refreshed: cannot start {' '.join(self.command)}: {e}")
            return False
        self.started += 1
        self.last_start = time.monotonic()
        return True

    def _reap(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        rc, self.proc = self.proc.returncode, None
        if rc != 0:
            self.echo(f"warning: refreshing the run's view failed (exit {rc}): {self._last_line()}; "
                      f"log: {self.log} (the run goes on)")

    def _last_line(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "?"
        return lines[-1].strip() if lines else "no output"

    def close(self) -> None:
        """At the end of the launch: report a finished refresh's failure, stop one still running."""
        self._reap()
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=STOP_WAIT_S)
                return
            except subprocess.TimeoutExpired:
                continue


__all__ = ["BackgroundRefresh", "refresh_log"]
