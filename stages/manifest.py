"""Manifest stage: from the crop stage's per-item results to the files fairseq's AV-HuBERT reads.

Runs once, one shard. Reads the crop stage's frozen item list (``crop/items/``, never the live
corpus: splits are recomputed from it with the current split settings, so a new split list needs
only a manifest re-run) and its results ``crop/results/*.jsonl`` (``{"id", "split", "text",
"status": "ok", "video", "audio", "n_frames", "n_samples", "video_bytes", "audio_bytes"}`` with
paths relative to the crop dir, or ``{"id", "status": "failed", "reason"}``; when an item was
planned again, the record of the later shard wins). Nothing is decoded: frame and sample counts
come from the crop records, checked cheaply (``verify=size``: each file exists with the size the
crop stage recorded; ``verify=decode`` recounts every file, in a process pool, as records
without sizes always are). Each pair must have ``n_samples`` within ``av_tolerance_frames`` x 640
of ``n_frames`` x 640 (16 kHz audio, 25 fps video). Writes into ``WORKDIR/manifest/``:

- ``{train,valid,test}.tsv``: first line the root, then one row per pair
  ``id<TAB>video<TAB>audio<TAB>n_video_frames<TAB>n_audio_samples`` (paths relative to the root),
  sorted by id. The root is the crop dir *relative to the tsv's own directory* (``../crop``): the
  work dir can move, two work dirs give the same bytes, and the loaders here
  (``avhubert.dataset.load_manifest``, ``speechfeat.shards.read_tsv``) resolve a relative root
  against the tsv's directory. (The reference AV-HuBERT code joins the root to each path as
  given, i.e. relative to its working directory: run it from ``manifest/``, or put an absolute
  root line in.) A split with no items still gets its root line.
- ``{split}.wrd`` (only when the corpus has transcripts): one line of words per tsv row, lower
  cased as the reference LRS3 preparation does (``lowercase``); an item without text gets an
  empty line.
- ``spm/spm_unigram{V}.model`` + ``.vocab``: a sentencepiece unigram model trained on the train
  text (``spm_vocab_size``, 1000 as the reference; character coverage 1.0 and fairseq's special
  ids bos=0 pad=1 eos=2 unk=3, as the reference's gen_subword.py; trained from memory with a
  fixed thread count, so the model holds no path and the same text gives the same bytes), and
  ``dict.wrd.txt`` (fairseq dictionary of its pieces, ``<piece> 1`` per line, specials left out),
  both in ``manifest/`` (where fairseq looks for ``dict.wrd.txt`` beside the ``.wrd`` labels) and
  in ``spm/``. When the train text is too small for V pieces, V is lowered to the most it
  supports, with a warning; ``V`` in the file name is the size actually trained.
  ``spm_model_path(ctx)`` finds it.
- ``failures.jsonl``: the crop failures plus the pairs this stage rejects, one JSON record per
  line ``{"id", "split", "stage", "reason"}``, sorted by id.
- ``summary.json``: per-split counts and frames, failure count, whether there is text, the spm
  model, its vocabulary size, how many items were left out as removed/changed (written last).
- ``inputs-<digest>.json``: what this manifest was built from (the item list's index, the
  drop setting). The digest is part of the shard's declared outputs, so once the crop stage
  froze new items (a new batch of videos) the manifest counts as incomplete and the same
  command rebuilds it.

Items whose source is gone or changed since it was listed (``crop/items/removed.txt``,
``changed.txt``: what the last launch that listed the corpus found) stay in the manifest (their
crops are fine) unless ``manifest.drop_removed=true``.

Differences from the reference (lrs3_manifest.py): the sentencepiece model sees the train text
only (not valid/test), and the tsv root is the crop dir with relative paths instead of ``/``
with absolute ones.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from pipeline import atomic
from pipeline.errors import ConfigError
from pipeline.fingerprint import classify
from pipeline.stage import Shard, Stage, StageContext
from stages import crop, estimates, item_list as il
from stages.corpus import CorpusSettings, SPLITS, assign_splits, corpus_settings, id_list_settings
from stages.item_list import read_json_lines

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 640  # 16000 Hz / 25 fps
PARALLEL_MIN_PAIRS = 256  # below this, counting in one process beats starting a pool
STAT_THREADS = 16
SPM_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
# sentencepiece stores its thread count in the model and its EM sums depend on it: a constant
# keeps the model the same on every machine
SPM_THREADS = 8
VERIFY = ("size", "decode")


@classify(output=("av_tolerance_frames", "lowercase", "spm_vocab_size", "drop_removed", "verify"),
          ignored={"workers": "how many processes check the files"})
@dataclass
class Config(CorpusSettings):
    # the corpus settings (splits, LRS3 segmentation) are CorpusSettings' (stages/corpus.py)
    av_tolerance_frames: float = 2.0  # |n_samples - 640 n_frames| allowed, in video frames
    lowercase: bool = True  # .wrd and spm text (the reference lower-cases LRS3 text)
    spm_vocab_size: int = 1000
    # leave out items whose source is gone or changed since it was listed (their crops are kept)
    drop_removed: bool = False
    verify: str = "size"  # size: files exist with the recorded sizes | decode: recount every file
    workers: int = 0  # processes recounting files (verify=decode, old records); 0 = every CPU the job has


class ManifestStage(Stage):
    name = "manifest"
    depends_on = ("crop",)
    libraries = ("sentencepiece",)

    def settings(self, ctx: StageContext) -> dict:
        return {**super().settings(ctx), **id_list_settings(ctx.cfg)}

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.manifest
        check_split_fractions("manifest", c)
        if float(c.max_segment_seconds) <= 0:
            raise ConfigError(f"manifest.max_segment_seconds={c.max_segment_seconds}: must be positive")
        if float(c.av_tolerance_frames) < 0:
            raise ConfigError(f"manifest.av_tolerance_frames={c.av_tolerance_frames}: must be >= 0")
        if int(c.spm_vocab_size) < 8:
            raise ConfigError(f"manifest.spm_vocab_size={c.spm_vocab_size}: must be at least 8")
        if c.get("verify", "size") not in VERIFY:
            raise ConfigError(f"manifest.verify={c.verify!r}: one of {', '.join(VERIFY)}")

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0, 1, "all")]

    def estimate(self, ctx: StageContext):
        return estimates.manifest(crop.STAGE.corpus_sizes.of(ctx))

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        out = ctx.stage_dir(self.name)
        return [out / f"{s}.tsv" for s in SPLITS] + [out / "failures.jsonl", out / "summary.json",
                                                      out / f"inputs-{inputs_digest(ctx)}.json"]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        out = ctx.stage_dir(self.name)
        frozen = frozen_items(ctx)
        drop = removed_or_changed(ctx) if ctx.cfg.manifest.get("drop_removed") else None
        summary = build_manifest(ctx.stage_dir("crop"), out, ctx.cfg.manifest, frozen, drop)
        n_items = len(frozen or ())
        del frozen
        marker = out / f"inputs-{inputs_digest(ctx)}.json"
        atomic.write_json(marker, {"item_list": _item_index_digest(ctx), "items": n_items,
                                   "drop_removed": drop is not None, "dropped": summary["dropped_removed"]})
        for old in out.glob("inputs-*.json"):
            if old != marker:
                old.unlink()
        return summary

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
# the frozen item list


def _items_dir(ctx: StageContext) -> Path:
    return ctx.with_iteration(None).stage_dir("crop") / "items"


def _item_index_digest(ctx: StageContext) -> str:
    try:
        return hashlib.sha256((_items_dir(ctx) / "index.json").read_bytes()).hexdigest()
    except FileNotFoundError:
        return "none"


def inputs_digest(ctx: StageContext) -> str:
    """What the manifest is built from, in 16 hex digits: the frozen item list's index (new
    batches change it) and, with drop_removed, the ids to leave out."""
    h = hashlib.sha256(_item_index_digest(ctx).encode())
    if ctx.cfg.manifest.get("drop_removed"):
        h.update(b"drop")
        for name in ("removed.txt", "changed.txt"):
            try:
                h.update((_items_dir(ctx) / name).read_bytes())
            except FileNotFoundError:
                pass
    return h.hexdigest()[:16]


def frozen_items(ctx: StageContext) -> Optional[dict]:
    """``{id: (split, text)}`` of the crop stage's frozen items, splits recomputed from the current
    split settings (None when there is no frozen list: results made by hand, older work dirs)."""
    idir = _items_dir(ctx)
    index = il.read_index(idir)
    if index is None:
        return None
    root = Path(str(ctx.cfg.get("corpus") or index.corpus)).expanduser().resolve()
    units, text = {}, {}
    for rec in il.iter_records(idir, index):  # a later record of an id (planned again) wins
        units[rec["id"]] = (rec["id"], rec.get("group", rec["id"]), rec.get("part", ""))
        text[rec["id"]] = rec.get("text")
    split_of = assign_splits(list(units.values()), index.layout, root, corpus_settings(ctx.cfg))
    return {i: (split_of[u[1]], text[i]) for i, u in units.items()}


def removed_or_changed(ctx: StageContext) -> set:
    idir = _items_dir(ctx)
    return il.read_id_file(idir / "removed.txt") | il.read_id_file(idir / "changed.txt")


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


def _result_files(results_dir: Path) -> list[Path]:
    # shard order (keys are numbers: 5 digits, more past 99999), so a later record of an id wins
    files = sorted(results_dir.glob("*.jsonl"), key=lambda p: (len(p.stem), p.stem))
    if not files:
        raise FileNotFoundError(f"{results_dir}: no crop results (*.jsonl); run the crop stage first")
    return files


def _read_results(results_dir: Path):
    """Every crop record with where it came from (``file:line``), in shard order, streamed."""
    for path in _result_files(results_dir):
        for n, rec in enumerate(read_json_lines(path), 1):
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise ValueError(f"{path}:{n}: a result record needs a string 'id'")
            yield rec, f"{path.name}:{n}"


class _Pair(NamedTuple):
    """An ok crop record, as much of it as the manifest needs (1.1M of them at VoxCeleb2 scale)."""

    id: str
    split: Optional[str]
    text: Optional[str]
    video: object
    audio: object
    n_frames: object
    n_samples: object
    video_bytes: object  # None: an older crop record without sizes
    audio_bytes: object

    @classmethod
    def of(cls, rec: dict) -> "_Pair":
        return cls(rec["id"], rec.get("split"), rec.get("text"), rec.get("video"), rec.get("audio"),
                   rec.get("n_frames"), rec.get("n_samples"), rec.get("video_bytes"), rec.get("audio_bytes"))


def _pair_paths(pair: _Pair, crop_dir: Path) -> dict:
    if pair.split not in SPLITS:
        raise ValueError(f"split {pair.split!r} is not one of {', '.join(SPLITS)}")
    paths = {}
    for key in ("video", "audio"):
        rel = getattr(pair, key)
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"no '{key}' path in the crop result")
        if "\t" in rel or "\n" in rel or Path(rel).is_absolute():
            raise ValueError(f"{key} path {rel!r} must be relative to the crop dir, without tabs")
        paths[key] = crop_dir / rel
    return paths


def _check_lengths(n_frames: int, n_samples: int, paths: dict, tolerance_frames: float):
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


def _check_sizes(pair: _Pair, crop_dir: Path, tolerance_frames: float):
    """The cheap check: the pair's files exist with the sizes the crop stage recorded (one stat
    each); counts from the record."""
    paths = _pair_paths(pair, crop_dir)
    for key in ("video", "audio"):
        try:
            size = os.stat(paths[key]).st_size
        except FileNotFoundError:
            raise ValueError(f"{key} file {paths[key]} does not exist") from None
        recorded = getattr(pair, f"{key}_bytes")
        if size != recorded:
            raise ValueError(f"{paths[key]} is {size} bytes, the crop stage wrote {recorded}: "
                             "changed after the crop (manifest.verify=decode recounts it)")
    return _check_lengths(int(pair.n_frames), int(pair.n_samples), paths, tolerance_frames)


def _check_pair(pair: _Pair, crop_dir: Path, tolerance_frames: float, count_frames, count_samples):
    """(n_frames, n_samples) of an ok record's pair recounted from its files, or raise
    ValueError with the reason."""
    paths = _pair_paths(pair, crop_dir)
    for key in ("video", "audio"):
        if not paths[key].is_file():
            raise ValueError(f"{key} file {paths[key]} does not exist")
    try:
        n_frames = int(count_frames(paths["video"]))
    except Exception as e:  # a broken file of one item must not stop the stage
        raise ValueError(f"cannot count the frames of {paths['video']}: {e}") from None
    try:
        n_samples = int(count_samples(paths["audio"]))
    except Exception as e:
        raise ValueError(f"cannot count the samples of {paths['audio']}: {e}") from None
    return _check_lengths(n_frames, n_samples, paths, tolerance_frames)


def _check_or_reason(job):
    check, args = job
    try:
        return check(*args)
    except ValueError as e:
        return str(e)


def _check_chunk(jobs):
    return [_check_or_reason(j) for j in jobs]


def _check_all(ok: list, crop_dir: Path, tolerance: float, verify: str, workers: int) -> list:
    """Per ok pair (n_frames, n_samples) or the reason it is rejected. Size checks are stats
    (STAT_THREADS threads whatever the CPUs: on a shared filesystem each stat waits for the
    metadata server); recounts decode (``workers`` processes)."""
    count_frames, count_samples = _media()
    sized, counted = [], []
    for k, pair in enumerate(ok):
        if verify == "size" and pair.video_bytes is not None and pair.audio_bytes is not None:
            sized.append((k, (_check_sizes, (pair, crop_dir, tolerance))))
        else:  # records of older crops carry no sizes
            counted.append((k, (_check_pair, (pair, crop_dir, tolerance, count_frames, count_samples))))
    out: list = [None] * len(ok)
    for jobs, pool_type in ((sized, concurrent.futures.ThreadPoolExecutor),
                            (counted, concurrent.futures.ProcessPoolExecutor)):
        if not jobs:
            continue
        plain = [j for _, j in jobs]
        threads = pool_type is concurrent.futures.ThreadPoolExecutor
        n = STAT_THREADS if threads else workers
        if n > 1 and len(jobs) >= PARALLEL_MIN_PAIRS:
            size = max(64, len(plain) // (n * 8))
            chunks = [plain[i:i + size] for i in range(0, len(plain), size)]
            with pool_type(max_workers=n) as pool:
                results = [r for part in pool.map(_check_chunk, chunks) for r in part]
        else:
            results = _check_chunk(plain)
        for (k, _), r in zip(jobs, results):
            out[k] = r
    return out


def build_manifest(crop_dir: Path, out_dir: Path, settings, items=None, drop=None) -> dict:
    """The whole stage: read the crop results under ``crop_dir``, write the manifest into
    ``out_dir``; returns the summary.

    ``items`` (the frozen item list with the current splits, ``frozen_items``) when given decides
    each pair's split and text; results of ids not among them are left out, and items without a
    result are counted (both with a warning). Without ``items`` the split and text recorded by the
    crop stage are used. ``drop``: ids to leave out (sources removed or changed since listing)."""
    crop_dir = Path(crop_dir).resolve()
    out_dir = Path(out_dir)
    tolerance = float(settings.av_tolerance_frames)
    lowercase = bool(settings.lowercase)
    verify = getattr(settings, "verify", None) or "size"

    if items is not None and not isinstance(items, dict):  # Items (tests, callers with a listing)
        items = {i.id: (i.split, i.text) for i in items}
    latest: dict = {}  # id -> _Pair, or the failure record (small dicts)
    for rec, where in _read_results(crop_dir / "results"):
        if rec["id"] in latest:
            log.info("%s: a later record of %s (planned again) replaces the earlier one", where, rec["id"])
        latest[rec["id"]] = _Pair.of(rec) if rec.get("status") == "ok" else rec
    failures, ok, dropped, left_out = [], [], [], 0
    for item_id, rec in latest.items():
        if items is not None:
            if item_id not in items:
                dropped.append(item_id)
                continue
            split, text = items[item_id]
        else:
            split, text = (rec.split, rec.text) if isinstance(rec, _Pair) else (rec.get("split"), rec.get("text"))
        if drop is not None and item_id in drop:
            left_out += 1
            continue
        if isinstance(rec, _Pair):
            ok.append(rec._replace(split=split, text=text))
        else:
            failures.append({"id": item_id, "split": split, "stage": "crop",
                             "reason": str(rec.get("reason") or f"crop status {rec.get('status')!r}")})
    if dropped:
        log.warning("%d crop results are for ids no longer in the item list (e.g. %s); left out",
                    len(dropped), ", ".join(dropped[:3]))
    not_cropped = []
    if items is not None:
        not_cropped = [i for i in items if i not in latest and not (drop is not None and i in drop)]
    if not_cropped:
        log.warning("%d items have no crop result (e.g. %s): re-run the crop stage to include them",
                    len(not_cropped), ", ".join(not_cropped[:3]))
    del latest
    if left_out:
        log.warning("manifest.drop_removed: %d items whose source is gone or changed are left out", left_out)

    workers = int(settings.workers) or len(os.sched_getaffinity(0))
    rows: dict[str, list[tuple]] = {s: [] for s in SPLITS}
    checked = _check_all(ok, crop_dir, tolerance, verify, workers)
    for k, result in enumerate(checked):
        pair = ok[k]
        if isinstance(result, str):
            failures.append({"id": pair.id, "split": pair.split, "stage": "manifest", "reason": result})
            continue
        n_frames, n_samples = result
        text = pair.text
        if text is not None:
            text = " ".join(str(text).split())
            text = (text.lower() if lowercase else text) or None
        rows[pair.split].append((pair.id, pair.video, pair.audio, n_frames, n_samples, text))
    del ok, checked

    atomic.write_text(out_dir / "failures.jsonl",
                      "".join(json.dumps(f, sort_keys=True) + "\n" for f in sorted(failures, key=lambda f: f["id"])))
    if not rows["train"]:
        raise RuntimeError(
            f"no usable train pairs in {crop_dir / 'results'} ({len(failures)} failures, see "
            f"{out_dir / 'failures.jsonl'})"
        )
    # the crop dir relative to the tsv's directory: see the module docstring
    root = os.path.relpath(crop_dir, out_dir.resolve())
    for split in SPLITS:
        rows[split].sort(key=lambda r: r[0])
        buf = io.StringIO()
        buf.write(root + "\n")
        for r in rows[split]:
            buf.write(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\n")
        atomic.write_text(out_dir / f"{split}.tsv", buf.getvalue())

    has_text = any(r[5] for split in SPLITS for r in rows[split])
    summary = {
        "root": root,
        "counts": {s: len(rows[s]) for s in SPLITS},
        "frames": {s: sum(r[3] for r in rows[s]) for s in SPLITS},
        "failures": len(failures),
        "not_in_corpus": len(dropped),
        "not_cropped": len(not_cropped),
        "dropped_removed": left_out,
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
    largest size sentencepiece accepts (with a warning). Returns (model path, V).

    Trained from memory into memory (sentencepiece then stores no input path or model prefix in
    the model) with SPM_THREADS threads: the same text gives the same bytes anywhere."""
    import sentencepiece as spm

    spm_dir.mkdir(parents=True, exist_ok=True)
    size = vocab_size
    for _ in range(3):
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=model, model_type="unigram", vocab_size=size,
                character_coverage=1.0, bos_id=0, pad_id=1, eos_id=2, unk_id=3, num_threads=SPM_THREADS,
                minloglevel=2,
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
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    for piece, index in SPM_SPECIALS.items():
        if processor.id_to_piece(index) != piece:
            raise RuntimeError(f"sentencepiece put {processor.id_to_piece(index)!r} at id {index}, not {piece!r}")
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    # the .vocab file as sentencepiece writes it: piece, tab, score (C++ stream format, %g)
    vocab = "".join(f"{p}\t{processor.get_score(i):g}\n" for i, p in enumerate(pieces))
    path = spm_dir / f"spm_unigram{size}.model"
    with atomic.atomic_open(path, "wb") as f:
        f.write(model.getvalue())
    atomic.write_text(path.with_suffix(".vocab"), vocab)
    atomic.write_text(spm_dir / "dict.wrd.txt", "".join(f"{p} 1\n" for p in pieces if p not in SPM_SPECIALS))
    return path, size
