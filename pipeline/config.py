"""The pipeline's configuration: typed sections, a preset, a cluster file and command-line overrides.

Order (later wins): the typed defaults of every section, ``presets/<preset>.yaml``,
``cluster_configs/<cluster>.yaml`` (under ``cluster``), then ``key=value`` overrides. Structured
(dataclass-backed) sections turn a misspelt key or a wrong type into one clear ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError
from pipeline.fingerprint import classify
from pipeline.stage import Resources

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = PROJECT_ROOT / "presets"
CLUSTER_DIR = PROJECT_ROOT / "cluster_configs"

EXECUTORS = ("debug", "local", "slurm")


_RESOURCE = "what a job asks the scheduler for: the same outputs on any allocation"


@classify(ignored={k: _RESOURCE for k in ("cpus_per_task", "mem_gb", "gpus_per_task", "timeout_min", "nodes",
                                         "tasks_per_node", "partition")})
@dataclass
class StageResources:
    """Per-stage resource overrides; None = take ``cluster.defaults``."""

    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    gpus_per_task: Optional[int] = None
    timeout_min: Optional[int] = None
    nodes: Optional[int] = None
    # tasks per node of a multi-task stage (training: one rank per GPU); None = gpus_per_node or 1
    tasks_per_node: Optional[int] = None
    # Slurm partition of this stage's jobs (e.g. GPUs for training, CPUs for crop); None = cluster.partition
    partition: Optional[str] = None


@classify(ignored={k: "the driver job only submits and waits" for k in
                  ("partition", "cpus_per_task", "mem_gb", "timeout_min", "max_requeues")})
@dataclass
class DriverResources:
    """The driver job of ``launch.py --detach`` on Slurm: one CPU that submits and waits."""

    partition: Optional[str] = None  # None = cluster.partition
    cpus_per_task: int = 1
    mem_gb: float = 2
    # its time limit; at the limit (or on preemption) it is requeued and resumes where it stopped
    timeout_min: int = 1440
    max_requeues: int = 1000


@classify(ignored={
    "name": "the cluster file's name", "executor": "where jobs run", "partition": _RESOURCE, "account": _RESOURCE,
    "qos": _RESOURCE, "max_array_size": "how shards are grouped into scheduler jobs",
    "array_parallelism": "how many shards run at once", "gpus_per_node": _RESOURCE,
    "poll_interval_s": "how often the launcher looks", "scheduler_poll_s": "how often the launcher looks",
    "progress_interval_s": "how often progress is printed", "view_refresh_s": "how often the run's view is rewritten", "fatal_pending_after_s": "when a stuck job is given up", "blocked_pending_after_s": "when a stuck job is given up",
    "check_requests": "a check before submitting", "check_free_space": "a check before submitting",
    "signal_delay_s": "when a job is told its time is up", "max_requeues": "how often a job may be requeued",
    "setup": "how a job's environment is set up", "slurm_additional_parameters": _RESOURCE,
    "defaults": _RESOURCE, "stages": _RESOURCE, "driver": "the driver job only submits and waits"})
@dataclass
class ClusterConfig:
    name: str = "local"
    executor: str = "local"  # debug | local | slurm
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # Slurm's MaxArraySize: larger stages are split into several arrays
    max_array_size: int = 1000
    # shards of one stage running at once (Slurm %N throttle; local: concurrent processes)
    array_parallelism: int = 2
    # GPUs per node of the training allocation (one rank per GPU); 0 on CPU clusters
    gpus_per_node: int = 0
    # seconds between looks at the shards' markers while waiting for jobs
    poll_interval_s: float = 1.0
    # seconds between scheduler queries (one squeue/sacct call for all jobs of a step)
    scheduler_poll_s: float = 15.0
    # seconds between progress lines in a log (a terminal gets a progress bar)
    progress_interval_s: float = 60.0
    # while a step's jobs run, the run's view (the report) is rewritten in the background at most
    # this often (and after every step); 0 = after steps only
    view_refresh_s: float = 900.0
    # a job pending for a reason that cannot clear (PartitionConfig, InvalidAccount, ...) for this
    # long fails its step
    fatal_pending_after_s: float = 10.0
    # a job that cannot start until someone acts (held by a user or an administrator, the nodes it
    # needs drained or down) is waited for this long, then cancelled and its step failed; longer
    # than a maintenance window, so a run left alone goes on once the nodes are back
    blocked_pending_after_s: float = 43200.0
    # check each request against the partition (and sbatch --test-only) before submitting
    check_requests: bool = True
    # refuse a step whose estimated outputs (stages/estimates.py) exceed the work dir's free space
    check_free_space: bool = True
    # seconds between the time-limit signal and the kill; None = min(90 s, 15% of the stage's limit)
    signal_delay_s: Optional[int] = None
    # preemptions/timeouts a checkpointable job may survive before it is given up (a job stopped
    # at its time limit is requeued only when it made progress since it started)
    max_requeues: int = 20
    # shell lines run before each Slurm job (module load, venv activation, ...)
    setup: List[str] = field(default_factory=list)
    # passed verbatim to sbatch (e.g. {constraint: volta32gb})
    slurm_additional_parameters: Dict[str, Any] = field(default_factory=dict)
    defaults: StageResources = field(
        default_factory=lambda: StageResources(cpus_per_task=1, mem_gb=4, gpus_per_task=0, timeout_min=60)
    )
    stages: Dict[str, StageResources] = field(default_factory=dict)
    driver: DriverResources = field(default_factory=DriverResources)


@classify(output=("layout",), ignored={
    "workdir": "where the outputs go (a work dir can be moved)",
    "corpus": "where the corpus is: its items are frozen and compared at every launch by the stage that "
              "lists it (new items are added, a moved corpus is matched by relative paths)",
    "iterations": "how many iterations run; what a step reads from which iteration is in its inputs",
    "preset": "its values are what count, each classified in its own section"})
@dataclass
class EngineConfig:
    workdir: str = "./work"
    corpus: Optional[str] = None
    layout: str = "plain"
    iterations: int = 1
    preset: str = "smoke"


def available(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"{what} {path}: cannot be read: {e}") from None


def load_config(
    sections: Dict[str, type],
    preset: Optional[str] = "smoke",
    cluster: Optional[str] = "local",
    overrides: Optional[List[str]] = None,
    engine_values: Optional[Dict[str, Any]] = None,
    preset_dir: Optional[Path] = None,
    cluster_dir: Optional[Path] = None,
    saved: Optional[Path] = None,
) -> DictConfig:
    """Build and validate the whole config tree. ``sections`` maps section names to dataclasses
    (the stages' typed configs); ``engine_values`` are settings from command-line flags
    (--workdir, --corpus, ...), applied after the preset and before ``key=value`` overrides.
    ``preset``/``cluster`` name files of ``preset_dir``/``cluster_dir`` (default: the
    repository's ``presets/`` and ``cluster_configs/``); a cluster may also be a .yaml path.
    ``saved``: a whole config a launch saved (``.pipeline/config.yaml``), applied first."""
    preset_dir = Path(preset_dir) if preset_dir is not None else PRESET_DIR
    cluster_dir = Path(cluster_dir) if cluster_dir is not None else CLUSTER_DIR
    # one dataclass for the whole tree, so every level is typed and closed to unknown keys
    hints = typing.get_type_hints(EngineConfig)
    root_fields = [(f.name, hints[f.name], dataclasses.field(default=f.default)) for f in dataclasses.fields(EngineConfig)]
    root_fields += [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections.items()]
    root_fields.append(("cluster", ClusterConfig, dataclasses.field(default_factory=ClusterConfig)))
    root = dataclasses.make_dataclass("PipelineConfig", root_fields)
    # the root's fields: the engine's keys as classified, every section by its own classification
    engine = EngineConfig.__settings_classes__
    classify(output=[*engine.output, *sections], per_iteration=engine.per_iteration,
             ignored={**engine.ignored, "cluster": _RESOURCE})(root)
    base = OmegaConf.structured(root)
    layers = [(f"saved config {saved}", _read_yaml(Path(saved), "saved config"))] if saved else []
    if preset:
        path = preset_dir / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}: no {path} (available: {', '.join(available(preset_dir))})")
        layers.append((f"preset {path}", _read_yaml(path, "preset")))
    if cluster:
        path = Path(cluster) if cluster.endswith((".yaml", ".yml")) else cluster_dir / f"{cluster}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown cluster {cluster!r}: no {path} (available: {', '.join(available(cluster_dir))})"
            )
        cluster_cfg = _read_yaml(path, "cluster config")
        cluster_cfg.setdefault("name", path.stem)
        layers.append((f"cluster config {path}", OmegaConf.create({"cluster": cluster_cfg})))
    if preset:
        layers.append(("--preset", OmegaConf.create({"preset": preset})))
    if engine_values:
        layers.append(("command-line flags", OmegaConf.create({k: v for k, v in engine_values.items() if v is not None})))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            layers.append(("command-line overrides", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command-line overrides: {e}") from None
    cfg = base
    for what, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ConfigError(f"{what}: {('key ' + repr(key) + ': ') if key else ''}{_first_line(e)}") from None
    validate_cluster(cfg.cluster)
    return cfg


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def validate_cluster(cluster: DictConfig) -> None:
    if cluster.executor not in EXECUTORS:
        raise ConfigError(f"cluster {cluster.name}: executor {cluster.executor!r} is not one of {EXECUTORS}")
    if cluster.max_array_size < 1 or cluster.array_parallelism < 1:
        raise ConfigError(f"cluster {cluster.name}: max_array_size and array_parallelism must be >= 1")
    for stage_name in ["defaults", *cluster.stages.keys()]:
        res = cluster.defaults if stage_name == "defaults" else cluster.stages[stage_name]
        for key in ("cpus_per_task", "nodes", "tasks_per_node", "timeout_min"):
            v = res.get(key)
            if v is not None and v < 1:
                raise ConfigError(f"cluster {cluster.name}: {stage_name}.{key}={v} must be >= 1")
        for key in ("gpus_per_task", "mem_gb"):
            v = res.get(key)
            if v is not None and v < 0:
                raise ConfigError(f"cluster {cluster.name}: {stage_name}.{key}={v} must be >= 0")
    d = cluster.driver
    if d.cpus_per_task < 1 or d.timeout_min < 1 or d.mem_gb < 0:
        raise ConfigError(f"cluster {cluster.name}: cluster.driver needs cpus_per_task >= 1, timeout_min >= 1, mem_gb >= 0")


def resources_for(cfg: DictConfig, stage_name: str, multi_task: bool = False) -> Resources:
    """The scheduler request of one job of ``stage_name``: stage overrides over the defaults.
    A multi-task stage (training) gets ``nodes`` x ``tasks_per_node`` ranks, one per GPU where the
    cluster has GPUs."""
    cluster = cfg.cluster
    merged = OmegaConf.to_container(cluster.defaults)
    if stage_name in cluster.stages:
        merged.update({k: v for k, v in OmegaConf.to_container(cluster.stages[stage_name]).items() if v is not None})
    res = Resources(
        cpus_per_task=int(merged.get("cpus_per_task") or 1),
        mem_gb=float(merged.get("mem_gb") or 0),
        gpus_per_task=int(merged.get("gpus_per_task") or 0),
        timeout_min=int(merged.get("timeout_min") or 60),
        nodes=1,
        tasks_per_node=1,
        partition=merged.get("partition") or cluster.partition or None,
    )
    if multi_task:
        res.nodes = int(merged.get("nodes") or 1)
        gpn = int(cluster.gpus_per_node or 0)
        res.tasks_per_node = int(merged.get("tasks_per_node") or gpn or 1)
        if gpn:
            res.gpus_per_task = 1
    return res


def signal_delay_s(cluster: DictConfig, timeout_min: float) -> int:
    """Seconds between the time-limit signal (USR2) and the kill: long enough to checkpoint and
    requeue, never a large part of a short limit (submitit's fixed 90 s before a 1 min limit
    signalled the job at its start, every time)."""
    if cluster.get("signal_delay_s"):
        return int(cluster.signal_delay_s)
    return int(max(5, min(90, 0.15 * float(timeout_min) * 60)))


def setting_name(cfg: DictConfig, stage_name: str, field_name: str) -> str:
    """The config key a resource value of a stage comes from (for error messages)."""
    cluster = cfg.cluster
    if field_name == "gpus_per_node":
        return "cluster.gpus_per_node"
    if field_name in ("account", "qos"):
        return f"cluster.{field_name}"
    if stage_name in cluster.stages and cluster.stages[stage_name].get(field_name) is not None:
        return f"cluster.stages.{stage_name}.{field_name}"
    if field_name == "partition":
        return "cluster.partition"
    return f"cluster.defaults.{field_name}"


def slurm_request(cfg: DictConfig, stage_name: str, res: Resources, what: str = "job"):
    """The sbatch request of one job of a stage, each value named by its config key."""
    from pipeline.scheduler import Request

    cluster = cfg.cluster
    gpus_per_node = res.gpus_per_task * res.tasks_per_node
    settings = {f: setting_name(cfg, stage_name, f) for f in
                ("partition", "nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "qos")}
    settings["gpus_per_node"] = ("cluster.gpus_per_node" if cluster.gpus_per_node
                                 else setting_name(cfg, stage_name, "gpus_per_task"))
    return Request(
        partition=res.partition, nodes=res.nodes, tasks_per_node=res.tasks_per_node,
        cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb, gpus_per_node=gpus_per_node,
        timeout_min=res.timeout_min, account=cluster.account, qos=cluster.qos,
        extra=dict(cluster.slurm_additional_parameters or {}), settings=settings, what=what,
    )


def driver_request(cfg: DictConfig):
    from pipeline.scheduler import Request

    cluster, d = cfg.cluster, cfg.cluster.driver
    settings = {f: f"cluster.driver.{f}" for f in ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min")}
    settings.update(partition="cluster.driver.partition" if d.partition else "cluster.partition",
                    account="cluster.account", qos="cluster.qos")
    return Request(
        partition=d.partition or cluster.partition, nodes=1, tasks_per_node=1, cpus_per_task=int(d.cpus_per_task),
        mem_gb=float(d.mem_gb or 0), gpus_per_node=0, timeout_min=int(d.timeout_min), account=cluster.account,
        qos=cluster.qos, extra=dict(cluster.slurm_additional_parameters or {}), settings=settings, what="driver job",
    )


def check_resources(cfg: DictConfig, stage_name: str, res: Resources, checker=None) -> None:
    """Impossible requests fail before anything is submitted. ``checker`` (a
    ``pipeline.scheduler.RequestChecker``) checks a Slurm request against the cluster."""
    import os

    executor = cfg.cluster.executor
    if executor == "slurm" and checker is not None and cfg.cluster.check_requests:
        checker.check(slurm_request(cfg, stage_name, res, what=f"{stage_name} job"))
        return
    if executor in ("debug", "local"):
        if res.nodes > 1:
            raise ConfigError(
                f"stage {stage_name}: {res.nodes} nodes requested but executor {executor!r} runs on this machine "
                f"only (set cluster.stages.{stage_name}.nodes=1)"
            )
        if res.gpus_per_task > 0 and not _local_gpus():
            raise ConfigError(
                f"stage {stage_name}: {res.gpus_per_task} GPU(s) per task requested but this machine has none "
                f"(set cluster.gpus_per_node=0 / cluster.stages.{stage_name}.gpus_per_task=0)"
            )
        ncpu = os.cpu_count() or 1
        if executor == "local" and res.cpus_per_task > ncpu:
            raise ConfigError(f"stage {stage_name}: cpus_per_task={res.cpus_per_task} but this machine has {ncpu} CPUs")


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or broken: no GPU we could use
        return 0


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def asdict(obj) -> dict:
    return dataclasses.asdict(obj)
