"""Manifest stage: from the crop stage's per-item results to the files fairseq's AV-HuBERT reads.

Runs once, one shard (it only reads headers and counts). Reads ``crop/results/*.jsonl``
(``{"id", "split", "text", "status": "ok", "video", "audio", "n_frames", "n_samples"}`` with paths
relative to the crop dir, or ``{"id", "status": "failed", "reason"}``), recounts the frames and
samples of every produced pair, checks that the audio covers the video (``n_samples`` within
``av_tolerance_frames`` x 640 of ``n_frames`` x 640: 16 kHz audio, 25 fps video) and writes into
``WORKDIR/manifest/``. Split and text come from the current corpus listing (``list_items``), so a
new split list or a fixed transcript only needs a manifest re-run, not a new crop:

- ``{train,valid,test}.tsv``: first line the root (the crop dir, absolute), then one row per pair
  ``id<TAB>video<TAB>audio<TAB>n_video_frames<TAB>n_audio_samples`` (paths relative to the root),
  sorted by id. A split with no items still gets its root line.
- ``{split}.wrd`` (only when the corpus has transcripts): one line of words per tsv row, lower
  cased as the reference LRS3 preparation does (``lowercase``); an item without text gets an
  empty line.
- ``spm/spm_unigram{V}.model`` + ``.vocab``: a sentencepiece unigram model trained on the train
  text (``spm_vocab_size``, 1000 as the reference; character coverage 1.0 and fairseq's special
  ids bos=0 pad=1 eos=2 unk=3, as the reference's gen_subword.py), and ``dict.wrd.txt`` (fairseq
  dictionary of its pieces, ``<piece> 1`` per line, specials left out), both in ``manifest/`` (where
  fairseq looks for ``dict.wrd.txt`` beside the ``.wrd`` labels) and in ``spm/``. When the train
  text is too small for V pieces, V is lowered to the most it supports, with a warning; ``V`` in
  the file name is the size actually trained. ``spm_model_path(ctx)`` finds it.
- ``failures.jsonl``: the crop failures plus the pairs this stage rejects, one JSON record per
  line ``{"id", "split", "stage", "reason"}``, sorted by id.
- ``summary.json``: per-split counts, failure count, whether there is text, the spm model, its
  vocabulary size (written last).

Differences from the reference (lrs3_manifest.py): the sentencepiece model sees the train text
only (not valid/test), and the tsv root is the crop dir with relative paths instead of ``/``
with absolute ones.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline import atomic
from pipeline.errors import ConfigError
from pipeline.stage import Shard, Stage, StageContext

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SAMPLES_PER_FRAME = 640  # 16000 Hz / 25 fps
PARALLEL_MIN_PAIRS = 256  # below this, counting in one process beats starting a pool
SPM_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


@dataclass
class Config:
    # splits (read by stages.corpus.list_items; see its docstring for the layouts)
    valid_ids: Optional[str] = None  # id list file (relative: to the corpus dir, then the cwd)
    test_ids: Optional[str] = None
    include_ids: Optional[str] = None  # restrict the corpus to these ids (e.g. VoxCeleb2 English)
    valid_fraction: float = 0.05  # without valid_ids: share of source videos drawn for valid
    test_fraction: float = 0.05  # plain layout without test_ids (lrs3/vox2 have a test/ dir)
    split_seed: int = 0
    # LRS3 pretrain segmentation (reference: 15 s, pauses > 0.4 s)
    max_segment_seconds: float = 15.0
    min_pause_seconds: float = 0.4
    # manifest
    av_tolerance_frames: float = 2.0  # |n_samples - 640 n_frames| allowed, in video frames
    lowercase: bool = True  # .wrd and spm text (the reference lower-cases LRS3 text)
    spm_vocab_size: int = 1000
    workers: int = 0  # processes recounting frames/samples; 0 = every CPU the job has


class ManifestStage(Stage):
    name = "manifest"
    depends_on = ("crop",)

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.manifest
        check_split_fractions("manifest", c)
        if float(c.max_segment_seconds) <= 0:
            raise ConfigError(f"manifest.max_segment_seconds={c.max_segment_seconds}: must be positive")
        if float(c.av_tolerance_frames) < 0:
            raise ConfigError(f"manifest.av_tolerance_frames={c.av_tolerance_frames}: must be >= 0")
        if int(c.spm_vocab_size) < 8:
            raise ConfigError(f"manifest.spm_vocab_size={c.spm_vocab_size}: must be at least 8")

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0, 1, "all")]

    def estimate(self, ctx: StageContext):
        from stages import estimates

        return estimates.manifest(ctx)

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        out = ctx.stage_dir(self.name)
        return [out / f"{s}.tsv" for s in SPLITS] + [out / "failures.jsonl", out / "summary.json"]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        from stages.corpus import list_items

        items = list_items(ctx.cfg) if ctx.cfg.get("corpus") else None
        return build_manifest(ctx.stage_dir("crop"), ctx.stage_dir(self.name), ctx.cfg.manifest, items)

    def finalize(self, ctx: StageContext, shard_stats: dict[str, dict]) -> dict:
        return read_summary(ctx)


STAGE = ManifestStage()


def check_split_fractions(section: str, c) -> None:
    """``<section>.valid_fraction`` and ``test_fraction``: each in [0, 1), together below 1."""
    for key in ("valid_fraction", "test_fraction"):
        if not 0 <= float(c[key]) < 1:
            raise ConfigError(f"{section}.{key}={c[key]}: must be in [0, 1)")
    if float(c.valid_fraction) + float(c.test_fraction) >= 1:
        raise ConfigError(f"{section}.valid_fraction + {section}.test_fraction must be below 1")


def manifest_dir(ctx: StageContext) -> Path:
    """``WORKDIR/manifest`` from any stage's context (the manifest runs once, not per iteration)."""
    return ctx.with_iteration(None).stage_dir("manifest")


def read_summary(ctx: StageContext) -> dict:
    return json.loads((manifest_dir(ctx) / "summary.json").read_text())


def spm_model_path(ctx: StageContext) -> Optional[Path]:
    """The sentencepiece model the manifest stage trained, None when the corpus has no text."""
    rel = read_summary(ctx).get("spm_model")
    return manifest_dir(ctx) / rel if rel else None


# ---------------------------------------------------------------------------------------------


def _media():
    """Frame/sample counters: the crop stage's (avprep.media) when present, else local ones."""
    try:
        from avprep.media import count_video_frames, count_wav_samples
    except ImportError:
        return _count_video_frames, _count_wav_samples
    return count_video_frames, count_wav_samples


def _count_video_frames(path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _count_wav_samples(path) -> int:
    import soundfile as sf

    return sf.info(str(path)).frames


def _read_results(results_dir: Path) -> list[tuple[dict, str]]:
    files = sorted(results_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{results_dir}: no crop results (*.jsonl); run the crop stage first")
    records = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise ValueError(f"{path}:{n}: a result record needs a string 'id'")
            records.append((rec, f"{path.name}:{n}"))
    return records


def _check_pair(rec: dict, crop_dir: Path, tolerance_frames: float, count_frames, count_samples):
    """(n_frames, n_samples) of an ok record's pair, or raise ValueError with the reason."""
    split = rec.get("split")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    paths = {}
    for key in ("video", "audio"):
        rel = rec.get(key)
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"no '{key}' path in the crop result")
        if "\t" in rel or "\n" in rel or Path(rel).is_absolute():
            raise ValueError(f"{key} path {rel!r} must be relative to the crop dir, without tabs")
        path = crop_dir / rel
        if not path.is_file():
            raise ValueError(f"{key} file {path} does not exist")
        paths[key] = path
    try:
        n_frames = int(count_frames(paths["video"]))
    except Exception as e:  # a broken file of one item must not stop the stage
        raise ValueError(f"cannot count the frames of {paths['video']}: {e}") from None
    try:
        n_samples = int(count_samples(paths["audio"]))
    except Exception as e:
        raise ValueError(f"cannot count the samples of {paths['audio']}: {e}") from None
    if n_frames <= 0:
        raise ValueError(f"{paths['video']} has no video frames")
    if n_samples <= 0:
        raise ValueError(f"{paths['audio']} has no audio samples")
    gap = n_samples - n_frames * SAMPLES_PER_FRAME
    if abs(gap) > tolerance_frames * SAMPLES_PER_FRAME:
        raise ValueError(
            f"audio/video length mismatch: {n_samples} samples ({n_samples / SAMPLES_PER_FRAME:.1f} frames of "
            f"audio) for {n_frames} video frames; off by {gap / SAMPLES_PER_FRAME:+.1f} frames, "
            f"tolerance {tolerance_frames:g}"
        )
    return n_frames, n_samples


def _check_pair_or_reason(job):
    try:
        return _check_pair(*job)
    except ValueError as e:
        return str(e)


def build_manifest(crop_dir: Path, out_dir: Path, settings, items=None) -> dict:
    """The whole stage: read the crop results under ``crop_dir``, write the manifest into
    ``out_dir``; returns the summary.

    ``items`` (``stages.corpus.list_items`` of the current config) when given decides each pair's
    split and text, so changing the split lists or fixing a transcript needs no new crop; results
    of ids no longer in the corpus are left out, and corpus items without a result are counted
    (both with a warning). Without ``items`` the split and text recorded by the crop stage are used."""
    crop_dir = Path(crop_dir).resolve()
    out_dir = Path(out_dir)
    count_frames, count_samples = _media()
    tolerance = float(settings.av_tolerance_frames)
    lowercase = bool(settings.lowercase)

    rows: dict[str, list[tuple[str, str, str, int, int, Optional[str]]]] = {s: [] for s in SPLITS}
    failures = []
    seen = set()
    ok = []
    corpus = {item.id: item for item in items} if items is not None else None
    dropped = []
    for rec, where in _read_results(crop_dir / "results"):
        item_id = rec["id"]
        if item_id in seen:
            log.warning("%s: id %s appears twice in the crop results; keeping the first", where, item_id)
            continue
        seen.add(item_id)
        if corpus is not None:
            if item_id not in corpus:
                dropped.append(item_id)
                continue
            rec = {**rec, "split": corpus[item_id].split, "text": corpus[item_id].text}
        status = rec.get("status")
        if status != "ok":
            failures.append({"id": item_id, "split": rec.get("split"), "stage": "crop",
                             "reason": str(rec.get("reason") or f"crop status {status!r}")})
        else:
            ok.append(rec)

    if dropped:
        log.warning("%d crop results are for ids no longer in the corpus (e.g. %s); left out",
                    len(dropped), ", ".join(dropped[:3]))
    not_cropped = sorted(set(corpus) - seen) if corpus is not None else []
    if not_cropped:
        log.warning("%d corpus items have no crop result (e.g. %s): the crop ran on other settings; "
                    "re-run it to include them", len(not_cropped), ", ".join(not_cropped[:3]))

    jobs = [(rec, crop_dir, tolerance, count_frames, count_samples) for rec in ok]
    workers = int(settings.workers) or len(os.sched_getaffinity(0))
    if workers > 1 and len(jobs) >= PARALLEL_MIN_PAIRS:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            checked = list(pool.map(_check_pair_or_reason, jobs, chunksize=64))
    else:
        checked = [_check_pair_or_reason(job) for job in jobs]
    for rec, result in zip(ok, checked):
        if isinstance(result, str):
            failures.append({"id": rec["id"], "split": rec.get("split"), "stage": "manifest", "reason": result})
            continue
        n_frames, n_samples = result
        text = rec.get("text")
        if text is not None:
            text = " ".join(str(text).split())
            text = (text.lower() if lowercase else text) or None
        rows[rec["split"]].append((rec["id"], rec["video"], rec["audio"], n_frames, n_samples, text))

    atomic.write_text(out_dir / "failures.jsonl",
                      "".join(json.dumps(f, sort_keys=True) + "\n" for f in sorted(failures, key=lambda f: f["id"])))
    if not rows["train"]:
        raise RuntimeError(
            f"no usable train pairs in {crop_dir / 'results'} ({len(failures)} failures, see "
            f"{out_dir / 'failures.jsonl'})"
        )
    for split in SPLITS:
        rows[split].sort(key=lambda r: r[0])
        lines = [str(crop_dir)] + ["\t".join(map(str, r[:5])) for r in rows[split]]
        atomic.write_text(out_dir / f"{split}.tsv", "\n".join(lines) + "\n")

    has_text = any(r[5] for split in SPLITS for r in rows[split])
    summary = {
        "root": str(crop_dir),
        "counts": {s: len(rows[s]) for s in SPLITS},
        "frames": {s: sum(r[3] for r in rows[s]) for s in SPLITS},
        "failures": len(failures),
        "not_in_corpus": len(dropped),
        "not_cropped": len(not_cropped),
        "has_text": has_text,
        "spm_model": None,
        "spm_vocab_size": None,
    }
    if has_text:
        missing = 0
        for split in SPLITS:
            missing += sum(1 for r in rows[split] if not r[5])
            atomic.write_text(out_dir / f"{split}.wrd", "".join((r[5] or "") + "\n" for r in rows[split]))
        if missing:
            log.warning("%d items have no transcript: empty lines in the .wrd files", missing)
        train_text = [r[5] for r in rows["train"] if r[5]]
        if train_text:
            model, size = train_sentencepiece(train_text, int(settings.spm_vocab_size), out_dir / "spm")
            with atomic.atomic_path(out_dir / "dict.wrd.txt") as dst:
                shutil.copyfile(out_dir / "spm" / "dict.wrd.txt", dst)
            summary.update(spm_model=model.relative_to(out_dir).as_posix(), spm_vocab_size=size)
        else:
            log.warning("the train split has no transcripts: no sentencepiece model")
    _remove_stale(out_dir, summary)
    atomic.write_json(out_dir / "summary.json", summary)
    return summary


def _remove_stale(out_dir: Path, summary: dict) -> None:
    """Text outputs of an earlier run that this run did not write (a forced re-run after the corpus
    lost its transcripts, or a differently sized spm model)."""
    keep = {out_dir / summary["spm_model"], (out_dir / summary["spm_model"]).with_suffix(".vocab")} \
        if summary["spm_model"] else set()
    stale = [p for p in (out_dir / "spm").glob("spm_unigram*") if p not in keep]
    if not summary["spm_model"]:
        stale += [out_dir / "dict.wrd.txt", out_dir / "spm" / "dict.wrd.txt"]
    if not summary["has_text"]:
        stale += [out_dir / f"{split}.wrd" for split in SPLITS]
    for path in stale:
        if path.is_file():
            log.info("removing %s, left by an earlier run", path)
            path.unlink()


def train_sentencepiece(texts: list[str], vocab_size: int, spm_dir: Path) -> tuple[Path, int]:
    """Train a unigram model on ``texts`` into ``spm_dir/spm_unigram{V}.model/.vocab`` plus
    ``spm_dir/dict.wrd.txt``; V is ``vocab_size`` or, when the text is too small for it, the
    largest size sentencepiece accepts (with a warning). Returns (model path, V)."""
    import sentencepiece as spm

    spm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-spm-", dir=spm_dir) as tmp:
        corpus = Path(tmp) / "text.txt"
        corpus.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        size = vocab_size
        for _ in range(3):
            prefix = Path(tmp) / f"spm_unigram{size}"
            try:
                spm.SentencePieceTrainer.train(
                    input=str(corpus), model_prefix=str(prefix), model_type="unigram", vocab_size=size,
                    character_coverage=1.0, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                    num_threads=max(1, min(16, len(os.sched_getaffinity(0)))), minloglevel=2,
                )
                break
            except RuntimeError as e:
                m = re.search(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
                if m is None or int(m.group(2)) >= size:
                    raise RuntimeError(f"sentencepiece training on {len(texts)} train lines failed: {e}") from e
                size = int(m.group(2))
                log.warning(
                    "manifest.spm_vocab_size=%d is more than the %d train lines support; training a %d-piece "
                    "model instead (use a bigger corpus or a smaller spm_vocab_size)", vocab_size, len(texts), size)
        processor = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
        for piece, index in SPM_SPECIALS.items():
            if processor.id_to_piece(index) != piece:
                raise RuntimeError(f"sentencepiece put {processor.id_to_piece(index)!r} at id {index}, not {piece!r}")
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        dictionary = "".join(f"{p} 1\n" for p in pieces if p not in SPM_SPECIALS)
        model = spm_dir / f"spm_unigram{size}.model"
        for suffix in (".model", ".vocab"):
            with atomic.atomic_path(spm_dir / f"spm_unigram{size}{suffix}") as dst:
                shutil.copyfile(str(prefix) + suffix, dst)
        atomic.write_text(spm_dir / "dict.wrd.txt", dictionary)
    return model, size
