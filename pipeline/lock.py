"""One launch per work dir. The lock file (``WORKDIR/.pipeline/lock``) names its holder: host, pid
and the pid's start time (a reused pid is another process), the role (a foreground launch or the
detached driver), the driver's Slurm job id. A lock whose holder is gone (kill -9, a power loss of
a login node, a driver job that ended) is recognised and taken over; the driver job requeued
after a timeout or preemption takes over its own lock (same job id). The file is created with its
whole content in one step, so a malformed lock is never a lock being written: it is reported."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from pipeline import procs
from pipeline.errors import LockHeld
from pipeline.lease import MALFORMED, Malformed, OwnedFile, holder_alive, new_token


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

    def owner(self) -> Optional[dict]:
        """The holder's record, None when unlocked; raises LockHeld for a malformed lock."""
        try:
            return self.file.read()
        except Malformed as e:
            raise LockHeld(f"the lock file is malformed: {e}. If no launch or driver runs in this work dir, "
                           f"remove {self.path}") from None

    def _dead(self, owner: dict) -> bool:
        if owner.get("job_id") and str(owner.get("job_id")) == str(self.me.get("job_id") or ""):
            return True  # our own driver job before its requeue
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
                if str(owner.get("job_id") or "") != str(self.me.get("job_id") or "_"):
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

    def release(self) -> None:
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
