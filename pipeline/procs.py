"""Who a process is, in a way a pid reuse cannot fool: host, pid, the kernel's start time of that
pid and the boot id. Used by the work dir lock, shard leases, local jobs and the local driver."""
from __future__ import annotations

import os
import socket
from typing import Optional

_BOOT_ID: Optional[str] = None


def hostname() -> str:
    return socket.gethostname()


def boot_id() -> str:
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = f.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


def start_time(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), None when
    no such process runs (a zombie counts as gone). Without /proc: '?' when the pid exists."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        if not os.path.isdir("/proc/self"):  # no procfs (not Linux): existence only
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return "?"
        return None
    # the command name (field 2) may contain spaces and parentheses: fields follow the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def identity(pid: Optional[int] = None) -> dict:
    pid = os.getpid() if pid is None else int(pid)
    return {"host": hostname(), "pid": pid, "start": start_time(pid), "boot": boot_id()}


def alive(info: dict) -> Optional[bool]:
    """Whether the process described by ``info`` (an ``identity``) still runs: True/False on its
    own host, None when it ran on another host (only its scheduler can tell then)."""
    if not info or info.get("host") != hostname():
        return None
    if info.get("boot") and boot_id() and info["boot"] != boot_id():
        return False  # this machine rebooted since
    try:
        now = start_time(int(info.get("pid", -1)))
    except (TypeError, ValueError):
        return False
    if now is None:
        return False
    recorded = info.get("start")
    return not (recorded and now != "?" and recorded != now)  # same pid, another process: gone
