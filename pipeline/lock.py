"""One launch per work dir. The lock file holds the owner's host and pid, so a lock left by a
process that died (kill -9, power loss of a login node) is recognised and cleared."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pipeline.errors import LockHeld


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: Path, stale_after_s: float = 7 * 24 * 3600):
        self.path = Path(workdir) / ".pipeline" / "lock"
        # a lock from another host cannot be checked for liveness: trust it until it is this old
        self.stale_after_s = stale_after_s
        self.cleared_stale: dict | None = None

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # half-written by a process killed at creation: treat as stale

    def _stale(self, owner: dict) -> bool:
        if not owner:
            return True
        if owner.get("host") == socket.gethostname():
            return not _pid_alive(int(owner.get("pid", -1)))
        return time.time() - float(owner.get("time", 0)) > self.stale_after_s

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                if self._stale(owner):
                    self.cleared_stale = owner
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise LockHeld(
                    f"work dir {self.path.parent.parent} is in use by another launch "
                    f"(pid {owner.get('pid')} on {owner.get('host')}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('time', 0)))}); "
                    f"wait for it to finish, or remove {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise LockHeld(f"could not take the lock {self.path}")

    def release(self) -> None:
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
