"""One writer per output: files that name their holder, taken atomically.

``OwnedFile`` is the primitive of the work dir lock and the shard leases: created with its whole
content in one step (written under a temporary name, then hard-linked to its name, which fails if
the name exists), replaced only under a short take-over guard after its holder was found dead,
removed only by its holder (each holder has a random token).

``ShardLease``: a job takes its shard's lease (``state/<scope>/<stage>/<key>.lease``) before it
touches anything of the shard. A job that finds the lease held by another live job exits without
touching the shard's outputs; a lease of a dead job (or of an earlier run of the same job, i.e. a
requeue) is taken over. So even two jobs started for one shard (a launcher killed between sbatch
and recording the job id, a user running two launches on two login nodes) never write it both.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, TypeVar

from pipeline import procs
from pipeline.scheduler import SchedulerError, SlurmScheduler

MALFORMED = {"malformed": True}
K = TypeVar("K")
_GUARD_STALE_S = 30.0  # a take-over holds its guard for milliseconds


class Malformed(Exception):
    """The file exists but is not a JSON object (what it holds is in the message)."""


def new_token() -> str:
    return uuid.uuid4().hex


class OwnedFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> Optional[dict]:
        """The holder's record, None when the file does not exist; ``Malformed`` when it is
        not a JSON object."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise Malformed(f"{self.path} is not text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            preview = text.strip()[:60] or "empty"
            raise Malformed(f"{self.path} does not hold JSON ({preview!r})") from None
        if not isinstance(data, dict):
            raise Malformed(f"{self.path} holds {type(data).__name__}, not a JSON object")
        return data

    def _write_tmp(self, info: dict) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}.{os.getpid()}.{new_token()[:8]}")
        with open(tmp, "w") as f:
            json.dump(info, f)
        return tmp

    def create(self, info: dict) -> bool:
        """Create the file holding ``info`` if it does not exist (atomic: never half-written)."""
        tmp = self._write_tmp(info)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # a filesystem without hard links: O_EXCL, then the content
            if e.errno not in (1, 95, 38):  # EPERM, EOPNOTSUPP, ENOSYS
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _guard(self, wait_s: float = 10.0):
        guard = self.path.with_name(self.path.name + ".takeover")
        deadline = time.time() + wait_s
        while True:
            try:
                os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                break
            except FileExistsError:
                try:
                    age = time.time() - guard.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age > _GUARD_STALE_S:  # its taker died in the middle of a take-over
                    guard.unlink(missing_ok=True)
                    continue
                if time.time() > deadline:
                    raise TimeoutError(f"{guard} has been held for {age:.0f} s")
                time.sleep(0.05)
        try:
            yield
        finally:
            guard.unlink(missing_ok=True)

    def _current_token(self) -> Optional[str]:
        try:
            cur = self.read()
        except Malformed:
            return "<malformed>"
        return None if cur is None else str(cur.get("token"))

    def replace_if(self, expected: Optional[dict], info: dict) -> bool:
        """Replace the file with ``info`` if it still holds ``expected`` (``MALFORMED`` for a
        malformed file, None for no file). False when someone else got there first."""
        want = None if expected is None else ("<malformed>" if expected is MALFORMED else str(expected.get("token")))
        with self._guard():
            if self._current_token() != want:
                return False
            tmp = self._write_tmp(info)
            os.replace(tmp, self.path)
            return True

    def remove_if(self, token: Optional[str]) -> bool:
        """Remove the file if it is held by ``token`` (its holder releasing it)."""
        with self._guard():
            if self._current_token() != str(token):
                return False
            self.path.unlink(missing_ok=True)
            return True


@dataclass(frozen=True)
class Liveness:
    """Whether a holder still runs: ``alive`` True/False, None when nothing here can tell (a
    process of another host, a scheduler that does not answer); ``state`` says it in words
    ('running', 'ended', 'pending (Priority)', 'on host h2', 'unknown (squeue failed ...)')."""

    alive: Optional[bool]
    state: str


def _slurm_job(holder: dict) -> str:
    job_id = str(holder.get("job_id") or "")
    return job_id if holder.get("executor") == "slurm" else ""


def holders_alive(holders: Mapping[K, dict]) -> dict[K, Liveness]:
    """The one rule by which the engine decides whether a holder still runs: the job that holds a
    shard lease, the launch or driver that holds the work dir lock, the detached driver of the
    driver record (``holder``: an identity of ``pipeline.procs`` plus ``executor`` and ``job_id``).

    Its process on this machine (pid + start time + boot id), when that process still runs, is
    alive. A Slurm job (executor slurm with a job id) is otherwise what the scheduler says: alive
    while queued or running, so a job requeued after a time limit or a preemption, between two
    runs, still holds what it held (its next run takes it over: same job id). Any other holder is
    alive exactly while its process runs; on another host nothing here can tell. One squeue (and
    sacct) call for all Slurm holders; callers decide what "cannot tell" means for them."""
    out: dict = {}
    ask: dict = {}
    for key, holder in holders.items():
        here = procs.alive(holder)
        if here:
            out[key] = Liveness(True, "running")
        elif _slurm_job(holder):
            ask[key] = _slurm_job(holder)
        elif here is False:
            out[key] = Liveness(False, "ended")
        else:
            out[key] = Liveness(None, f"on host {holder.get('host')}")
    if ask:
        try:
            infos = SlurmScheduler().query(sorted(set(ask.values())))
        except SchedulerError as e:
            out.update({key: Liveness(None, f"unknown ({e})") for key in ask})
        else:
            out.update({key: Liveness(infos[job].alive, infos[job].describe()) for key, job in ask.items()})
    return out


def holder_alive(holder: dict) -> Optional[bool]:
    """``holders_alive`` of one holder: True, False, or None when nothing can tell."""
    return holders_alive({0: holder})[0].alive


class ShardLease:
    def __init__(self, state_dir: Path, key: str):
        self.file = OwnedFile(Path(state_dir) / f"{key}.lease")

    @property
    def path(self) -> Path:
        return self.file.path

    def holder(self) -> Optional[dict]:
        try:
            return self.file.read()
        except Malformed:
            return MALFORMED

    def acquire(self, me: dict) -> Optional[dict]:
        """Take the lease for ``me`` (with ``token`` and ``job_id``); None when taken, else the
        record of the live holder (or of one whose liveness nobody can tell), which we leave be."""
        for _ in range(20):
            if self.file.create(me):
                return None
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            takeover = (
                holder is MALFORMED
                # an earlier run of this same job (requeued after a timeout or preemption)
                or str(holder.get("job_id")) == str(me.get("job_id"))
                or holder_alive(holder) is False
            )
            if not takeover:
                return holder
            if self.file.replace_if(holder, me):
                return None
        raise RuntimeError(f"could not take the lease {self.path}: it keeps changing hands")

    def release(self, me: dict) -> None:
        try:
            self.file.remove_if(me.get("token"))
        except OSError:  # a full disk must not hide the shard's own error
            pass

    def break_if_held_by(self, job_id: str) -> bool:
        """Remove the lease when it is held by ``job_id`` (the engine knows that job is over)."""
        holder = self.holder()
        if holder is None or holder is MALFORMED or str(holder.get("job_id")) != str(job_id):
            return False
        return self.file.remove_if(holder.get("token"))


def describe_holder(holder: dict) -> str:
    if holder is MALFORMED:
        return "a malformed lease"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("time", 0) or 0)))
    return f"job {holder.get('job_id')} (host {holder.get('host')}, pid {holder.get('pid')}, since {since})"
