"""One launch per work dir. The lock file (``WORKDIR/.pipeline/lock``) names its holder: host, pid
and the pid's start time (a reused pid is another process), the role (a foreground launch or the
detached driver), the driver's Slurm job id. A lock whose holder is gone (kill -9, a power loss of
a login node, a driver job that ended) is recognised and taken over; the driver job requeued
after a timeout or preemption takes over its own lock (same job id). The file is created with its
whole content in one step, so a malformed lock is never a lock being written: it is reported.

A detaching launch takes the lock before it submits the driver, then hands it over (``hand_over``)
to the driver it started (its Slurm job id, or its process): of two launches at the same instant
one gets the lock and one driver, the other a refusal. The driver takes over the lock handed to
it (same job id, same process, or the handing launch's token passed in ``HANDOVER_ENV``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import os

from pipeline import procs
from pipeline.errors import LockHeld
from pipeline.lease import MALFORMED, Malformed, OwnedFile, holder_alive, new_token


HANDOVER_ENV = "PIPELINE_LOCK_HANDOVER"  # the token of the lock a detaching launch hands to its driver


def describe_owner(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("time", 0) or 0)))
    if owner.get("role") == "driver" and owner.get("executor") == "slurm":
        return f"the driver job {owner.get('job_id')} (since {since})"
    what = "the detached driver" if owner.get("role") == "driver" else "another launch"
    return f"{what} (pid {owner.get('pid')} on {owner.get('host')}, since {since})"


class WorkdirLock:
    def __init__(self, workdir: Path, stale_after_s: float = 7 * 24 * 3600, role: str = "launch",
                 extra: Optional[dict] = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / ".pipeline" / "lock"
        self.file = OwnedFile(self.path)
        # a lock from another host with no scheduler job to ask about: trusted until it is this old
        self.stale_after_s = stale_after_s
        self.cleared_stale: Optional[dict] = None
        self.me = {"token": new_token(), "role": role, **procs.identity(), "time": time.time(), **(extra or {})}
        # a driver takes over the lock its detaching launch handed to it
        self.handed_token = os.environ.get(HANDOVER_ENV) if role == "driver" else None
        self.handed_over = False

    def owner(self) -> Optional[dict]:
        """The holder's record, None when unlocked; raises LockHeld for a malformed lock."""
        try:
            return self.file.read()
        except Malformed as e:
            raise LockHeld(f"the lock file is malformed: {e}. If no launch or driver runs in this work dir, "
                           f"remove {self.path}") from None

    def _mine(self, owner: dict) -> bool:
        """The lock is this driver's: its own job before a requeue, or handed to it."""
        if owner.get("job_id") and str(owner.get("job_id")) == str(self.me.get("job_id") or ""):
            return True  # our own driver job before its requeue (or handed to it)
        if self.handed_token and owner.get("token") == self.handed_token:
            return True  # handed to this driver by the launch that started it
        return self.me.get("role") == "driver" and all(owner.get(k) == self.me.get(k) for k in ("host", "pid", "start"))

    def _dead(self, owner: dict) -> bool:
        if self._mine(owner):
            return True
        alive = holder_alive(owner)
        if alive is not None:
            return not alive
        return time.time() - float(owner.get("time", 0) or 0) > self.stale_after_s

    def acquire(self) -> "WorkdirLock":
        for _ in range(10):
            if self.file.create(self.me):
                return self
            owner = self.owner()
            if owner is None:
                continue  # released meanwhile
            if not self._dead(owner):
                raise LockHeld(
                    f"work dir {self.workdir} is in use by {describe_owner(owner)}: follow it with "
                    f"`python launch.py status --workdir {self.workdir}`, stop it with "
                    f"`python launch.py cancel --workdir {self.workdir}` (or remove {self.path} if that process is gone)"
                )
            if self.file.replace_if(owner, self.me):
                if not self._mine(owner):
                    self.cleared_stale = owner
                return self
        raise LockHeld(f"could not take the lock {self.path}: it keeps changing hands")

    def check_free(self) -> None:
        """Raise LockHeld when a live launch or driver holds the lock (nothing is taken)."""
        owner = self.owner()
        if owner is not None and not self._dead(owner):
            raise LockHeld(f"work dir {self.workdir} is in use by {describe_owner(owner)}: "
                           f"`python launch.py status --workdir {self.workdir}` follows it, "
                           f"`python launch.py cancel --workdir {self.workdir}` stops it")

    def hand_over(self, holder: dict) -> None:
        """Give the held lock to the driver just started (``holder``: executor and job id, or its
        process identity); it keeps this lock's token, so the driver finds it handed to it."""
        owner = {"token": self.me["token"], "role": "driver", "time": time.time(), **holder}
        if not self.file.replace_if(self.me, owner):
            raise LockHeld(f"the lock {self.path} changed hands while the driver was being started")
        self.me, self.handed_over = owner, True

    def release(self) -> None:
        if self.handed_over:
            return  # the driver holds it now
        try:
            self.file.remove_if(self.me["token"])
        except (OSError, TimeoutError):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_holder(workdir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(holder record or None, a problem line or None) for `status` and `cancel`."""
    f = OwnedFile(Path(workdir) / ".pipeline" / "lock")
    try:
        return f.read(), None
    except Malformed as e:
        return MALFORMED, f"the lock file is malformed ({e}); if nothing runs in this work dir, remove it"


__all__ = ["WorkdirLock", "lock_holder", "describe_owner"]
