"""What the scheduler says about our jobs, in as few calls as possible, and what it would accept.

- ``SlurmScheduler.query(job_ids)``: one ``squeue`` call for every live job asked about (state,
  pending reason), then one ``sacct`` call for the ones no longer queued (end state, exit code,
  signal, requeues). Array tasks are asked for by their array id, so a 1000-task array is one id.
- ``LocalScheduler.query``: local jobs are processes of this machine: alive when the recorded
  pid still runs with the recorded start time (a reused pid is another process).
- ``SlurmScheduler.check_request``: an impossible request (more nodes, CPUs, memory, GPUs or time
  than the partition offers, a partition that does not exist, what ``sbatch --test-only`` rejects)
  is one ``ConfigError`` naming the setting, before anything is submitted.

Pending reasons that cannot clear by themselves (``FATAL_PENDING``) fail a step; the others
(Resources, Priority, Dependency, JobArrayTaskLimit, ...) are shown while waiting. A held job
(priority 0: a user or admin hold, "launch failed requeued held") is shown with the command that
releases it (``clear_command``).

The two views are reconciled: slurmctld (squeue) is the authority on what is queued or runs. A
job it does not know while sacct still says PENDING or RUNNING (a controller restarted from state
saved before the job was submitted: it purged the job, the accounting record stays) is ``LOST``,
never alive; the waiter resubmits its shard after a few polls (``executors.Waiter``).
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Iterable, Optional

from pipeline import procs
from pipeline.errors import ConfigError, PipelineError

# job states of a job that will not run again (sacct / squeue names)
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "ENDED", "LOST",
}
# an sacct state of a job the controller does not know that is not an end state: the record of a
# job lost by the controller (its end never reaches the accounting)
_SACCT_LIVE = {"PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING", "COMPLETING", "RESIZING",
               "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
# pending reasons that never clear by themselves: the request exceeds what the partition, the
# account or the QOS allows, or names something that does not exist
FATAL_PENDING = {
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidAccount", "InvalidQOS",
    "BadConstraints", "DependencyNeverSatisfied", "AccountNotAllowed", "QOSNotAllowed",
}
# ... and families of them: a per-job maximum of the association or QOS, an exhausted CPU/GPU-minute
# budget of the account (AssocGrp*Minutes*), a required node that does not exist
FATAL_PENDING_PATTERNS = (
    re.compile(r"^(Assoc|QOS)Max\w*PerJob\w*$"),
    re.compile(r"^(Assoc|QOS)Grp\w*Minutes?\w*$"),
    re.compile(r"^ReqNodeNotAvail.*UnavailableNodes:\s*$"),
)


class SchedulerError(PipelineError):
    """The scheduler did not answer (slurmctld down, command missing)."""


def fatal_pending(reason: str) -> bool:
    reason = (reason or "").strip()
    return reason in FATAL_PENDING or any(p.match(reason) for p in FATAL_PENDING_PATTERNS)


@dataclass
class JobInfo:
    """One job (or array task) as the scheduler sees it."""

    job_id: str
    state: str  # Slurm state name (RUNNING, PENDING, COMPLETED, TIMEOUT, ...); ENDED = gone, no details
    reason: str = ""
    exit_code: str = ""  # "code:signal" as sacct prints it
    time_limit: str = ""
    start: str = ""
    end: str = ""
    node: str = ""
    restarts: int = 0
    priority: Optional[int] = None  # squeue's; 0 for a held job
    name: str = ""  # the job name squeue gives

    @property
    def alive(self) -> bool:
        return self.state.split(" ")[0] not in TERMINAL  # "CANCELLED by 0"

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"

    @property
    def held(self) -> bool:
        """Pending on a hold (it never starts until released): priority 0, or a held reason."""
        return self.pending and (self.priority == 0 or "held" in self.reason.lower())

    @property
    def launch_failed(self) -> bool:
        """Held by the scheduler after its launch failed on a node (a prolog error, a node that
        could not start it): "launch failed requeued held"."""
        return self.held and "launch failed" in self.reason.lower()

    @property
    def blocked(self) -> bool:
        """Pending until someone acts: held, or the nodes it needs are drained or down."""
        return self.held or (self.pending and bool(clear_command(self)))

    @property
    def lost(self) -> bool:
        return self.state == "LOST"

    def describe(self) -> str:
        """One line: why this job ended (or where it is, when it has not)."""
        state = self.state
        if self.held:
            return f"pending, held ({self.reason or 'priority 0'}); release it with {clear_command(self)}"
        if state == "PENDING":
            cmd = clear_command(self)
            return f"pending ({self.reason or 'no reason given'})" + (f": {cmd}" if cmd else "")
        if state == "LOST":
            return f"lost by the scheduler ({self.reason})"
        if self.alive:
            return state.lower()
        code, _, sig = (self.exit_code or "").partition(":")
        if state == "TIMEOUT":
            text = f"time limit {limit_minutes(self.time_limit)}"
        elif state == "OUT_OF_MEMORY":
            text = "out of memory"
        elif state.startswith("CANCELLED"):
            by = state[len("CANCELLED"):].strip()  # "by 1234": the uid that cancelled it
            text = "cancelled" + (f" (by user id {by[3:]})" if by.startswith("by ") else "")
        elif state == "NODE_FAIL":
            text = f"node failure ({self.node})" if self.node else "node failure"
        elif state == "PREEMPTED":
            text = "preempted"
        elif sig and sig != "0":
            text = f"killed by signal {sig}{_signal_name(sig)}"
        elif state == "FAILED":
            text = f"failed with exit code {code or '?'}"
        elif state == "COMPLETED":
            text = "the job ended normally without recording the shard"
        elif state == "ENDED":
            text = "the job ended (no accounting record)"
        else:
            text = state.lower()
        if self.restarts:
            text += f", requeued {self.restarts} time{'s' if self.restarts > 1 else ''}"
        return text


def clear_command(info: JobInfo) -> str:
    """The command that lets a held or blocked pending job go on (quoted for a message)."""
    reason = info.reason or ""
    if info.held:
        who = " (an administrator's hold: only an operator can release it)" if reason == "JobHeldAdmin" else ""
        return f"`scontrol release {info.job_id}`{who}"
    if any(k in reason for k in ("ReqNodeNotAvail", "NodeDown", "PartitionDown", "PartitionInactive")) \
            or "DRAINED" in reason.upper():
        return ("`sinfo -R` (why the nodes are down or drained); an administrator resumes a node with "
                "`scontrol update nodename=NODE state=resume`")
    return ""


def _signal_name(sig: str) -> str:
    try:
        return f" ({signal.Signals(int(sig)).name})"
    except (ValueError, TypeError):
        return ""


def limit_minutes(limit: str) -> str:
    """Slurm's ``[D-]HH:MM:SS`` as '60 min' (the unit the cluster config uses)."""
    m = re.match(r"^(?:(\d+)-)?(\d+):(\d+):(\d+)$", limit or "")
    if not m:
        m2 = re.match(r"^(\d+):(\d+)$", limit or "")
        if m2:
            return f"{int(m2.group(1))} min"
        return limit or "?"
    d, h, mi, s = (int(x or 0) for x in m.groups())
    minutes = d * 1440 + h * 60 + mi + (1 if s else 0)
    return f"{minutes} min"


def expand_array_id(job_id: str) -> list[str]:
    """'123_[2-5%2]' / '123_[1,4-5]' -> ['123_2', ...]; any other id as it is."""
    m = re.match(r"^(\d+)_\[([\d,\-]+)(?:%\d+)?\]$", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def base_id(job_id: str) -> str:
    return str(job_id).split("_")[0].split(".")[0]


def _run(cmd: list, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SchedulerError(f"{cmd[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{' '.join(cmd[:2])} did not answer within {timeout:.0f} s") from None


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


class SlurmScheduler:
    kind = "slurm"

    def query(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """``{job_id: JobInfo}`` for every id asked about ('123' or '123_4'): one squeue call (every
        state the controller still knows), one sacct call for the jobs that ended or that the
        controller does not know (per 500 array ids).

        A job the controller does not know (squeue) is ``LOST`` while sacct says it is pending or
        running, or has no record of it: a controller restarted from older state forgot it. A
        job that ended recently is still known to the controller (``MinJobAge``)."""
        wanted = {str(j) for j in job_ids if j}
        if not wanted:
            return {}
        known: dict[str, JobInfo] = {}
        bases = sorted({base_id(j) for j in wanted})
        for chunk in _chunks(bases, 500):
            known.update(self._squeue(chunk))
        gone = sorted({base_id(j) for j in wanted if j not in known or not known[j].alive})
        ended: dict[str, JobInfo] = {}
        for chunk in _chunks(gone, 500):
            ended.update(self._sacct(chunk))
        result = {}
        for j in wanted:
            rec = ended.get(j)
            recorded_end = rec is not None and rec.state.split(" ")[0] not in _SACCT_LIVE
            if j in known and known[j].alive:
                result[j] = known[j]
            elif recorded_end:
                result[j] = rec
            elif j in known:  # it ended a moment ago: sacct has not recorded it yet
                result[j] = JobInfo(j, "ENDED")
            elif rec is not None:
                # the controller does not know it: not alive, whatever the accounting still says
                # (the waiter gives sacct a few polls to record an end that just happened)
                result[j] = JobInfo(j, "LOST", f"squeue does not know it; sacct still says {rec.state}",
                                    rec.exit_code, rec.time_limit, rec.start, rec.end, rec.node, rec.restarts)
            else:
                result[j] = JobInfo(j, "LOST", "neither squeue nor sacct knows it")
        return result

    def _squeue(self, bases: list) -> dict[str, JobInfo]:
        p = _run(["squeue", "-h", "-r", "-t", "all", f"--jobs={','.join(bases)}", "-o", "%i|%T|%r|%l|%S|%N|%Q|%j"])
        if p.returncode != 0:
            if "Invalid job id" in p.stderr:  # every id asked about has left the queue
                return {}
            raise SchedulerError(f"squeue failed: {(p.stderr or p.stdout).strip()[:300]}")
        out = {}
        for line in p.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 6:
                continue
            jid, state, reason, limit, start, node = (x.strip() for x in parts[:6])
            priority = int(parts[6]) if len(parts) > 6 and parts[6].strip().isdigit() else None
            name = "|".join(parts[7:]).strip()  # last: a name may hold '|' 
            out[jid] = JobInfo(jid, state, reason if reason != "None" else "", "", limit, start, "", node,
                               priority=priority, name=name)
        return out

    def _sacct(self, bases: list) -> dict[str, JobInfo]:
        fields = "JobID,State,ExitCode,Reason,Timelimit,Start,End,NodeList"
        # every run of a requeued job (-D), and the job steps: srun's step says which signal
        # killed the task when the allocation only says "exit code 9"
        p = _run(["sacct", "-D", "-n", "-P", "-j", ",".join(bases), "-o", fields])
        if p.returncode != 0:
            raise SchedulerError(f"sacct failed: {(p.stderr or p.stdout).strip()[:300]}")
        attempts: dict[str, list] = {}
        steps: dict[str, list] = {}
        for line in p.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 8:
                continue
            job, _, step = parts[0].partition(".")
            for jid in expand_array_id(job):  # never-started array tasks come as a range
                (steps if step else attempts).setdefault(jid, []).append((step, parts))
        out = {}
        for jid, rows in attempts.items():
            last = rows[-1][1]
            state = last[1] if last[1].startswith("CANCELLED") else (last[1].split() or ["ENDED"])[0]
            restarts = sum(1 for _, r in rows[:-1] if r[1].split()[0] in ("REQUEUED", "PREEMPTED", "NODE_FAIL", "TIMEOUT"))
            exit_code = last[2]
            for step, r in steps.get(jid, []):
                code, _, sig = r[2].partition(":")
                if step[:1].isdigit() and r[1].split()[0] == "OUT_OF_MEMORY" and state == "FAILED":
                    state = "OUT_OF_MEMORY"
                if step[:1].isdigit() and sig not in ("", "0") and state == "FAILED":
                    exit_code = f"{code}:{sig}"  # the task was killed by this signal
            out[jid] = JobInfo(jid, state, last[3], exit_code, last[4], last[5], last[6], last[7], restarts)
        return out

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = sorted({str(j) for j in job_ids if j})
        for chunk in _chunks(ids, 500):
            p = _run(["scancel", *chunk])
            if p.returncode != 0 and "Invalid job id" not in p.stderr:
                raise SchedulerError(f"scancel failed: {p.stderr.strip()[:300]}")

    def submit(self, args: list) -> str:
        """``sbatch --parsable ARGS``: the job id; SchedulerError with sbatch's error line."""
        p = _run(["sbatch", "--parsable", *args])
        if p.returncode != 0:
            raise SchedulerError(sbatch_error_line(p.stderr or p.stdout))
        return p.stdout.strip().split(";")[0]

    def release(self, job_ids: Iterable[str]) -> None:
        """Release held jobs (``scontrol release``)."""
        ids = sorted({str(j) for j in job_ids if j})
        for chunk in _chunks(ids, 500):
            p = _run(["scontrol", "release", ",".join(chunk)])
            if p.returncode != 0 and "Invalid job id" not in p.stderr:
                raise SchedulerError(f"scontrol release failed: {p.stderr.strip()[:300]}")

    def jobs_named(self, suffix: str) -> dict[str, str]:
        """{job id: name} of the live jobs of this user whose name ends with ``suffix`` (the work
        dir's tag)."""
        import getpass

        p = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%j"])
        if p.returncode != 0:
            raise SchedulerError(f"squeue failed: {p.stderr.strip()[:300]}")
        rows = (line.split("|", 1) for line in p.stdout.splitlines() if "|" in line)
        return {job: name for job, name in rows if name.endswith(suffix)}

    # --- what the cluster offers -----------------------------------------------------------------
    def default_partition(self) -> Optional[str]:
        p = _run(["sinfo", "-h", "-o", "%P"])
        for name in p.stdout.split():
            if name.endswith("*"):
                return name[:-1]
        return None

    def partition(self, name: str) -> Optional[dict]:
        """Limits of a partition (scontrol's keys) and its nodes' CPUs, memory (MB) and GPUs; None
        when there is no such partition."""
        p = _run(["scontrol", "show", "partition", name, "-o"])
        if p.returncode != 0 or "PartitionName=" not in p.stdout:
            if "not found" in p.stderr + p.stdout or p.returncode == 0:
                return None
            raise SchedulerError(f"scontrol show partition failed: {p.stderr.strip()[:300]}")
        info = dict(re.findall(r"(\w+)=(\S*)", p.stdout))
        q = _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G|%t"])
        nodes = {}
        for line in q.stdout.splitlines():
            node, cpus, mem, gres, state = (line.split("|") + ["", "", "", "", ""])[:5]
            nodes[node] = {"cpus": _int(cpus), "mem_mb": _int(mem), "gpus": gpu_count(gres), "state": state.strip()}
        info["nodes"] = nodes
        return info

    def partitions(self) -> list[str]:
        p = _run(["sinfo", "-h", "-o", "%P"])
        return [n.rstrip("*") for n in p.stdout.split()]

    def test_submit(self, args: list) -> Optional[str]:
        """What ``sbatch --test-only`` says against these sbatch arguments: None when it would
        accept them, else its error line."""
        p = _run(["sbatch", "--test-only", *args, "--wrap", "true"])
        if p.returncode == 0:
            return None
        return sbatch_error_line(p.stderr or p.stdout)


def sbatch_error_line(text: str) -> str:
    """The informative line of sbatch's complaint ('allocation failure: ...' / 'error: ...')."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.startswith("Try ")]
    for ln in reversed(lines):
        for marker in ("allocation failure:", "Batch job submission failed:", "error:"):
            if marker in ln:
                return ln.split(marker, 1)[1].strip()
    return lines[0].removeprefix("sbatch: ") if lines else "sbatch failed without a message"


def node_usable(state: str) -> bool:
    """A node state of sinfo's %t that can run a job now (not drained, down or not responding)."""
    return state.rstrip("~#%$@^-!+") in ("idle", "mix", "alloc", "comp", "resv", "plnd")


def gpu_count(gres: str) -> int:
    """GPUs in a node's Gres string ('gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2', '(null)')."""
    total = 0
    for part in (gres or "").split(","):
        fields = part.split("(")[0].split(":")
        if fields and fields[0] == "gpu":
            try:
                total += int(fields[-1])
            except ValueError:
                total += 1
    return total


def _int(text: str) -> int:
    m = re.match(r"\d+", (text or "").strip())
    return int(m.group(0)) if m else 0


def _max_time_minutes(text: str) -> Optional[int]:
    if not text or text in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    m = re.match(r"^(?:(\d+)-)?(\d+):(\d+):(\d+)$", text)
    if m:
        d, h, mi, s = (int(x or 0) for x in m.groups())
        return d * 1440 + h * 60 + mi + (1 if s else 0)
    m = re.match(r"^(?:(\d+)-)?(\d+)$", text)  # minutes, or days-hours
    if m:
        return int(m.group(1) or 0) * 1440 + int(m.group(2)) * (60 if m.group(1) else 1)
    return None


@dataclass
class Request:
    """One job's request with the config setting each value comes from (for the error line)."""

    partition: Optional[str]
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    mem_gb: float
    gpus_per_node: int
    timeout_min: int
    account: Optional[str] = None
    qos: Optional[str] = None
    extra: Optional[dict] = None
    settings: Optional[dict] = None  # field -> 'cluster.stages.train.nodes', ...
    what: str = "job"

    def setting(self, field: str) -> str:
        return (self.settings or {}).get(field, f"cluster.{field}")

    def sbatch_args(self, partition: str) -> list:
        args = [f"--partition={partition}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}",
                f"--cpus-per-task={self.cpus_per_task}", f"--time={self.timeout_min}"]
        if self.mem_gb:
            args.append(f"--mem={int(round(self.mem_gb * 1024))}M")
        if self.gpus_per_node:
            args.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.account:
            args.append(f"--account={self.account}")
        if self.qos:
            args.append(f"--qos={self.qos}")
        for k, v in (self.extra or {}).items():
            k = str(k).replace("_", "-")
            args.append(f"--{k}" if v is True else f"--{k}={v}")
        return args


class RequestChecker:
    """Checks requests against the cluster, one scheduler call per partition and per distinct
    request (a plan of a dozen steps costs a few calls)."""

    def __init__(self, scheduler: Optional[SlurmScheduler] = None):
        self.scheduler = scheduler or SlurmScheduler()
        self._partitions: dict = {}
        self._tested: dict = {}

    def _partition(self, name: str):
        if name not in self._partitions:
            self._partitions[name] = self.scheduler.partition(name)
        return self._partitions[name]

    def check(self, req: Request) -> None:
        part_name = req.partition or self.scheduler.default_partition()
        if not part_name:
            raise ConfigError(f"{req.setting('partition')} is not set and the cluster has no default partition")
        part = self._partition(part_name)
        if part is None:
            names = ", ".join(self.scheduler.partitions()) or "none"
            raise ConfigError(f"{req.setting('partition')}={part_name}: no such partition (partitions: {names})")
        nodes = part["nodes"]
        n_nodes = len(nodes) or _int(part.get("TotalNodes", "0"))
        where = f"partition {part_name}"
        if req.nodes > n_nodes:
            raise ConfigError(f"{req.setting('nodes')}={req.nodes}: {where} has {n_nodes} node{'s' if n_nodes != 1 else ''}")
        max_nodes = part.get("MaxNodes", "UNLIMITED")
        if max_nodes.isdigit() and req.nodes > int(max_nodes):
            raise ConfigError(f"{req.setting('nodes')}={req.nodes}: {where} allows at most {max_nodes} node(s) per job")
        cpus_needed = req.cpus_per_task * req.tasks_per_node
        # the n largest nodes must each offer what one node of the job needs
        fitting = [n for n in nodes.values() if n["cpus"] >= cpus_needed]
        max_cpus = max((n["cpus"] for n in nodes.values()), default=0)
        per_node_cap = part.get("MaxCPUsPerNode", "UNLIMITED")
        if per_node_cap.isdigit():
            max_cpus = min(max_cpus, int(per_node_cap))
        if nodes and (cpus_needed > max_cpus or len(fitting) < req.nodes):
            what = (f"{req.setting('cpus_per_task')}={req.cpus_per_task}" if req.tasks_per_node == 1 else
                    f"{req.setting('cpus_per_task')}={req.cpus_per_task} x {req.setting('tasks_per_node')}="
                    f"{req.tasks_per_node} = {cpus_needed} CPUs per node")
            raise ConfigError(f"{what}: the nodes of {where} have at most {max_cpus} CPUs")
        if req.mem_gb and nodes:
            mem_mb = req.mem_gb * 1024
            max_mem = max(n["mem_mb"] for n in nodes.values())
            cap = part.get("MaxMemPerNode", "UNLIMITED")
            if cap.isdigit():
                max_mem = min(max_mem, int(cap))
            if mem_mb > max_mem:
                raise ConfigError(f"{req.setting('mem_gb')}={req.mem_gb:g}: the nodes of {where} have at most "
                                  f"{max_mem / 1024:.1f} GB")
        if req.gpus_per_node and nodes:
            max_gpus = max(n["gpus"] for n in nodes.values())
            if req.gpus_per_node > max_gpus:
                have = "no GPUs" if not max_gpus else f"at most {max_gpus} GPUs per node"
                raise ConfigError(f"{req.setting('gpus_per_node')}={req.gpus_per_node}: {where} has {have}")
        max_time = _max_time_minutes(part.get("MaxTime", ""))
        if max_time is not None and req.timeout_min > max_time:
            raise ConfigError(f"{req.setting('timeout_min')}={req.timeout_min}: {where} allows at most {max_time} min")
        if part.get("State", "UP") not in ("UP", ""):
            raise ConfigError(f"{req.setting('partition')}={part_name}: the partition is {part.get('State')}")
        args = tuple(req.sbatch_args(part_name))
        if args not in self._tested:
            self._tested[args] = self.scheduler.test_submit(list(args))
        err = self._tested[args]
        if err and nodes and not any(node_usable(n.get("state", "")) for n in nodes.values()):
            # every node of the partition is drained or down (a maintenance window): sbatch cannot
            # test the request now; the job waits, blocked, and the waiter says so within its bound
            return
        if err:
            named = [f"{req.setting(k)}={v}" for k, v in (("partition", part_name), ("account", req.account),
                                                           ("qos", req.qos)) if v]
            raise ConfigError(f"the scheduler rejects the {req.what} ({', '.join(named)}): {err}")


class LocalScheduler:
    """Local jobs are process groups of this machine (submitit's controller started in its own
    session); the record holds its pid, start time and boot id."""

    kind = "local"

    def query_records(self, records: dict[str, dict]) -> dict[str, JobInfo]:
        out = {}
        for job_id, rec in records.items():
            alive = procs.alive(rec)
            if alive is None:  # recorded on another machine: nothing here can tell
                out[job_id] = JobInfo(job_id, "UNKNOWN", f"a local job of host {rec.get('host')}")
            else:
                out[job_id] = JobInfo(job_id, "RUNNING" if alive else "ENDED")
        return out

    def cancel_records(self, records: dict[str, dict], grace_s: float = 5.0) -> list[str]:
        """Stop the process group of each live record (SIGTERM, then SIGKILL after ``grace_s``);
        returns the job ids signalled."""
        import time

        live = {j: r for j, r in records.items() if procs.alive(r)}
        for rec in live.values():
            _killpg(int(rec["pid"]), signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(procs.alive(r) for r in live.values()):
            time.sleep(0.1)
        for rec in live.values():
            if procs.alive(rec):
                _killpg(int(rec["pid"]), signal.SIGKILL)
        return list(live)


def _killpg(pid: int, sig) -> None:
    import os

    try:
        os.killpg(pid, sig)  # the controller leads its own session: its tasks are in its group
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def slurm_available() -> bool:
    return shutil.which("squeue") is not None
