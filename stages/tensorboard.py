"""The TensorBoard logs of a fairseq run (``<stage dir>/tensorboard/<tag>/events.out.tfevents.*``,
one dir per log tag: ``train_inner``, ``train``, ``valid``): their scalars, read without
TensorFlow, and the loss curve the train stage draws from them (``loss.png``); the run report
reads the same scalars.
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Dict, List, Tuple

from pipeline.atomic import atomic_path

def _read_event_records(path: Path):
    """Yield serialized Event protos of one tfevents file (TFRecord framing); a record cut short
    by a killed writer ends the file, a record failing its CRC is skipped."""
    try:
        from tensorboardX.crc32c import masked_crc32c
    except ImportError:  # pragma: no cover - tensorboardX always ships it
        masked_crc32c = None
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if masked_crc32c is not None and struct.unpack("<I", footer)[0] != masked_crc32c(data):
                continue
            yield data


def read_scalars_file(path: Path) -> Dict[str, List[Tuple[int, float, float]]]:
    """``{tag: [(step, value, wall_time), ...]}`` of one events file, in file order."""
    from tensorboardX.proto import event_pb2

    out: Dict[str, List[Tuple[int, float, float]]] = {}
    for data in _read_event_records(Path(path)):
        event = event_pb2.Event()
        event.ParseFromString(data)
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append(
                    (int(event.step), float(value.simple_value), float(event.wall_time)))
    return out


def events_files(logdir: Path) -> List[Path]:
    """tfevents files of a log dir in creation order (their names start with the unix time)."""

    def created(path: Path):  # events.out.tfevents.<unix time>.<host>...
        stamp = path.name.split(".")[3] if path.name.count(".") >= 3 else ""
        return (int(stamp) if stamp.isdigit() else int(path.stat().st_mtime), path.name)

    return sorted(Path(logdir).glob("events.out.tfevents.*"), key=created)


def read_scalars(logdir: Path) -> Dict[str, List[Tuple[int, float, float, int]]]:
    """``{tag: [(step, value, wall_time, file_index), ...]}`` from every events file under
    ``logdir`` (files in creation order). A step logged twice (work redone after a resume from
    an earlier checkpoint) keeps its latest value."""
    latest: Dict[str, Dict[int, Tuple[float, float, int]]] = {}
    for index, path in enumerate(events_files(logdir)):
        for tag, points in read_scalars_file(path).items():
            seen = latest.setdefault(tag, {})
            for step, value, wall_time in points:
                prev = seen.get(step)
                if prev is None or wall_time >= prev[1]:
                    seen[step] = (value, wall_time, index)
    return {
        tag: [(step, v, t, i) for step, (v, t, i) in sorted(steps.items())]
        for tag, steps in latest.items()
    }


def plot_loss_curve(tensorboard_dir: Path, png: Path, title: str) -> dict:
    """Write ``png``: training loss per update (fairseq's ``train_inner`` log) and validation loss,
    with a dashed line where a resumed run took over. Returns a small summary."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font search spam at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensorboard_dir = Path(tensorboard_dir)
    train = read_scalars(tensorboard_dir / "train_inner").get("loss", [])
    if not train:  # log_interval larger than the run: fall back to the per-epoch averages
        train = read_scalars(tensorboard_dir / "train").get("loss", [])
    valid = read_scalars(tensorboard_dir / "valid").get("loss", [])
    if not train and not valid:
        raise RuntimeError(
            f"no loss values in the TensorBoard logs under {tensorboard_dir}: did fairseq run with "
            "common.tensorboard_logdir and a log_interval within max_update?"
        )
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot([s for s, *_ in train], [v for _, v, *_ in train], "-o", ms=3, label="train")
    if valid:
        ax.plot([s for s, *_ in valid], [v for _, v, *_ in valid], "s--", ms=4, label="valid")
    first_step_of_file: Dict[int, int] = {}
    for step, _, _, index in train:
        first_step_of_file[index] = min(step, first_step_of_file.get(index, step))
    resumes = sorted(step for index, step in first_step_of_file.items() if index > 0)
    for step in resumes:
        ax.axvline(step - 0.5, color="gray", ls=":", lw=1)
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {
        "loss_png": str(png),
        "train_points": len(train),
        "valid_points": len(valid),
        "first_train_loss": train[0][1] if train else None,
        "last_train_loss": train[-1][1] if train else None,
        "last_valid_loss": valid[-1][1] if valid else None,
        "resumed_at_updates": resumes,
    }
