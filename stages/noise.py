"""noise: noise clips and noise manifests for noise-robust training and evaluation.

Runs once, after the manifest. Two sources, one output form:

- **corpus noise** (``noise.corpus_categories``, default ``babble`` = 30 talkers, ``speech`` = 1
  talker, as the reference's ``lrs3_noise.py`` / ``musan_prepare.py``): each clip is the sum of N
  talker streams of ``clip_seconds``; a stream is random utterances of one split of the manifest,
  each loudness-normalised, following one another, so N voices speak at every instant; the sum is
  normalised to ``level_db``. Train clips use train utterances, valid clips valid utterances, test
  clips test utterances. Where the layout knows speakers (lrs3, vox2: the ``<spk>`` level of the
  ids) train noise leaves out the speakers of valid and test, and valid noise those of test, so no
  voice of the evaluation noise was heard in training noise.
- **user noise folders** (``noise.dirs``): every audio file (any format libsndfile or ffmpeg
  reads, any rate and channel count) as 16 kHz mono, cut into ``piece_seconds`` pieces (the last
  one kept from ``min_piece_seconds``), each loudness-normalised. ``PATH`` is one category named
  after the folder, except a MUSAN root (sub-folders ``music``, ``noise``, ``speech``: one category
  each); ``CATEGORY=PATH`` names it. Splits: the files of a category are ordered by a seeded hash
  of their path and ``valid_fraction`` / ``test_fraction`` of them (at least one each from three
  files) go to valid / test, the rest to train, so every piece of a recording is in one split. A
  category of one or two files (a long recording) is split in time instead: the first pieces of
  each file train, then valid, then test.

Work dir (lists: one wav a line, relative to the list's directory, then for a corpus clip its
talkers, tab-separated, so the dataset never mixes an utterance with its own voice: the form
``task.noise_wav`` reads, directly or per category with ``task.noise_categories``)::

    noise/{train,valid,test}.tsv            every category
    noise/<category>/{train,valid,test}.tsv one category
    noise/<category>/corpus/<split>/N.wav   corpus clips (16 kHz mono int16)
    noise/<category>/files/<folder>/<path>-K.wav  pieces of the recordings under a folder
    noise/plan/index.json, plan/<shard>.json  the frozen plan (see below)
    noise/results/<shard>.jsonl             one record per clip written, file skipped or failed
    noise/failures.jsonl, noise/summary.json

``prepare`` reads the manifest and lists the folders once per launch and freezes the plan (which
utterances make each corpus clip, which file goes to which split, the shards) with a fingerprint
of the settings and inputs; a shard then reads only its own plan file, so its cost is its own
clips. Later launches with the same fingerprint reuse the plan; a different one (new settings,
a re-run manifest, changed folders) is an error until ``--stage noise --force`` rebuilds the noise
(which consumers then read). Every draw is seeded per clip: the same inputs and settings give
byte-identical outputs. A file that cannot be decoded gets a failure record (``finalize`` fails the
stage above ``max_failure_rate``); disk and signal errors fail the shard.

Consumers: ``train.noise`` / ``finetune.noise`` (``stages.noise_use.NoiseUse``: probability, SNR, categories) wire
the lists into the fairseq task; ``finetune.noise.eval_snrs`` decodes under noise. The stage runs in
``--stage all`` when one of them needs it (``enabled`` null), always (true) or never (false).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from omegaconf import OmegaConf

from pipeline import atomic
from pipeline.errors import ConfigError, InputsMissing, StageFailed, raise_if_infrastructure
from pipeline.fingerprint import classify
from pipeline.stage import Shard, Stage, StageContext
from speechfeat.noise import (AUDIO_EXTENSIONS, assign_splits, babble, cut_pieces, load_mono_16k, loudness_db,
                              normalise_loudness, plan_talker_streams, seeded_unit, split_counts, talker_stream,
                              to_int16)
from speechfeat.shards import read_tsv
from stages.finetune import STAGE as FINETUNE
from stages.manifest import check_split_fractions
from stages.noise_use import (CATEGORY_NAME, SPLITS, corpus_categories, noise_dir, noise_sources, parse_dir_entry,
                              uses_noise_stage)

log = logging.getLogger(__name__)

PLAN_VERSION = 1


# clips_per_shard / files_per_shard are part of the frozen plan (its result files are per shard)
@classify(output=("corpus_categories", "corpus_clips", "clip_seconds", "dirs", "piece_seconds", "min_piece_seconds",
                  "valid_fraction", "test_fraction", "seed", "level_db", "clips_per_shard", "files_per_shard"),
          ignored={"enabled": "whether the stage takes part in --stage all",
                   "max_failure_rate": "a check: the step fails above it, what is written is the same"})
@dataclass
class Config:
    # Run in --stage all: null = when train.noise / finetune.noise use it; true / false = always / never.
    enabled: Optional[bool] = None
    # Noise made of the corpus' own utterances: category -> talkers summed per clip (reference:
    # babble of 30 utterances; "speech" = one interfering talker). 0 talkers = not made; null = none.
    corpus_categories: Optional[Dict[str, int]] = field(default_factory=lambda: {"babble": 30, "speech": 1})
    # Clips of each corpus category per split (reference MUSAN babble: 8000 / 1000 / 1000).
    corpus_clips: Dict[str, int] = field(default_factory=lambda: {"train": 1000, "valid": 100, "test": 100})
    clip_seconds: float = 10.0
    # Folders of noise recordings: "PATH" (category = folder name; a MUSAN root gives music, noise,
    # speech) or "CATEGORY=PATH". The reference recipe: music=/data/musan/music, noise=/data/musan/noise.
    dirs: List[str] = field(default_factory=list)
    piece_seconds: float = 10.0  # reference musan_prepare.py: 10 s pieces
    min_piece_seconds: float = 3.0  # reference noise_manifest.py: pieces of at least 3 s
    valid_fraction: float = 0.1  # reference noise_manifest.py: 80 / 10 / 10
    test_fraction: float = 0.1
    seed: int = 0
    level_db: float = -25.0  # gated loudness of every clip written (dBFS)
    clips_per_shard: int = 100  # corpus clips per shard
    files_per_shard: int = 50  # noise files per shard
    max_failure_rate: float = 0.2  # share of noise files that may fail to decode


# ---------------------------------------------------------------------------------- consumers


def noise_consumers(ctx: StageContext) -> List[str]:
    """The settings that need this work dir's noise stage."""
    cfg = ctx.cfg
    out = []
    if "train" in cfg and uses_noise_stage(cfg.train.get("noise")):
        out.append("train.noise")
    if "finetune" in cfg and uses_noise_stage(cfg.finetune.get("noise")) and FINETUNE.enabled(ctx):
        out.append("finetune.noise")
    return out


# ---------------------------------------------------------------------------------- inputs


def speaker_of(item_id: str, layout: str) -> Optional[str]:
    """The speaker of an item where the layout knows it: lrs3 ``<part>/<spk>/<utt>``, vox2
    ``<part>/<spk>/<clip>/<utt>``; None for plain corpora."""
    parts = item_id.split("/")
    if layout in ("lrs3", "vox2") and len(parts) >= 3:
        return parts[1]
    return None


def utterance_pools(manifest: Path, layout: str) -> Dict[str, List[tuple]]:
    """``{split: [(id, absolute wav path, samples), ...]}``: the utterances each split's corpus
    noise is drawn from, with the speakers of later splits left out of earlier ones."""
    rows = {}
    for split in SPLITS:
        root, split_rows = read_tsv(manifest / f"{split}.tsv")
        rows[split] = [(r.id, str(root / r.audio), r.n_audio_samples) for r in split_rows]
    speakers = {s: {speaker_of(r[0], layout) for r in rows[s]} - {None} for s in SPLITS}
    held_out = {"train": speakers["valid"] | speakers["test"], "valid": speakers["test"], "test": set()}
    return {s: [r for r in rows[s] if speaker_of(r[0], layout) not in held_out[s]] for s in SPLITS}


def list_audio_files(folder: Path) -> List[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(AUDIO_EXTENSIONS)]
    return out


# ---------------------------------------------------------------------------------- the plan


def _settings(c) -> dict:
    keys = ("corpus_categories", "corpus_clips", "clip_seconds", "dirs", "piece_seconds", "min_piece_seconds",
            "valid_fraction", "test_fraction", "seed", "level_db", "clips_per_shard", "files_per_shard")

    return {k: OmegaConf.to_container(c[k]) if OmegaConf.is_config(c[k]) else c[k] for k in keys}


def scan_inputs(ctx: StageContext) -> dict:
    """What the noise is made from: the settings, the layout, the noise files by category (one
    listing of the folders) and a fingerprint of all that and of the manifest's bytes."""
    c = ctx.cfg.noise
    settings = _settings(c)
    layout = str(ctx.cfg.get("layout") or "plain")
    manifest = ctx.with_iteration(None).stage_dir("manifest")
    digest = hashlib.sha256(json.dumps({"settings": settings, "layout": layout, "version": PLAN_VERSION},
                                       sort_keys=True).encode())
    for split in SPLITS:
        digest.update((manifest / f"{split}.tsv").read_bytes())
    files: Dict[str, list] = {}
    for category, folder, label in noise_sources(c.dirs):
        files.setdefault(category, [])
        for path in list_audio_files(folder):
            stat = path.stat()
            digest.update(f"{category}\x1f{path}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode())
            files[category].append((f"{label}/{path.relative_to(folder).as_posix()}", path))
    return {"settings": settings, "layout": layout, "manifest": manifest, "files": files,
            "fingerprint": digest.hexdigest()}


def build_plan(ctx: StageContext, inputs: dict) -> dict:
    """The whole stage as data: shards of corpus clips (the utterances of each talker) and of
    noise files (their category and split), with the inputs' fingerprint."""
    c = ctx.cfg.noise
    layout, manifest = inputs["layout"], inputs["manifest"]
    notes: List[str] = []

    corpus_jobs = []
    categories = set()
    if corpus_categories(c):
        pools = utterance_pools(manifest, layout)
        length = int(round(float(c.clip_seconds) * 16000))
        for category, talkers in sorted(corpus_categories(c).items()):
            categories.add(category)
            for split in SPLITS:
                n_clips, pool = int(c.corpus_clips.get(split, 0)), pools[split]
                if n_clips and not pool:
                    notes.append(f"no {split} utterances to make {category} noise from: no {split} {category} clips")
                    continue
                if n_clips and len(pool) < int(talkers):
                    notes.append(f"{category} {split}: {len(pool)} utterances for {talkers} talkers per clip "
                                 "(voices repeat within a clip)")
                durations = np.array([p[2] for p in pool], dtype=np.int64)
                usable = np.flatnonzero(durations > 0)
                for index in range(n_clips if pool else 0):
                    rng = np.random.RandomState(int(seeded_unit(c.seed, "corpus", category, split, index) * 2 ** 32))
                    streams = plan_talker_streams(rng, durations, int(talkers), length, usable)
                    corpus_jobs.append({
                        "kind": "corpus", "category": category, "split": split,
                        "out": f"{category}/corpus/{split}/{index:06d}.wav", "length": length,
                        "talkers": [{"offset": int(rng.randint(0, max(1, durations[s[0]]))),
                                     "utterances": [[pool[i][0], pool[i][1]] for i in s]} for s in streams],
                    })

    file_jobs = []
    by_category = inputs["files"]
    categories |= set(by_category)
    for category, files in sorted(by_category.items()):
        if not files:
            notes.append(f"{category}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) under its folder")
            continue
        keys = [k for k, _ in files]
        by_file = (assign_splits(keys, c.seed, float(c.valid_fraction), float(c.test_fraction), salt=category)
                   if len(files) >= 3 else {})
        if len(files) < 3:
            notes.append(f"{category}: {len(files)} file(s): split in time (first pieces train, then valid, test)")
        for key, path in sorted(files):
            file_jobs.append({"kind": "file", "category": category, "source": str(path),
                              "out": f"{category}/files/{key}", "split": by_file.get(key)})
    for category in sorted(set(corpus_categories(c)) | set(by_category)):
        if not CATEGORY_NAME.match(category):
            raise ConfigError(f"noise: category {category!r} is not a category name (letters, digits, _ . -)")

    shards = []
    for kind, jobs, per in (("corpus", corpus_jobs, int(c.clips_per_shard)), ("files", file_jobs, int(c.files_per_shard))):
        for i, start in enumerate(range(0, len(jobs), per)):
            shards.append({"key": f"{kind}-{i:05d}", "jobs": jobs[start:start + per]})
    return {"version": PLAN_VERSION, "fingerprint": inputs["fingerprint"], "settings": inputs["settings"],
            "layout": layout, "categories": sorted(categories), "notes": notes, "shards": shards}


class NoiseStage(Stage):
    name = "noise"
    depends_on = ("manifest",)
    reads = ("layout",)  # which talkers a clip may not mix (lrs3/vox2 ids name the speaker)
    libraries = ("numpy", "scipy", "soundfile", "av")

    def __init__(self):
        self._uncommitted: Dict[str, dict] = {}  # plans not written (a dry run's, or not yet), by dir
        self._to_write: Dict[str, dict] = {}  # what commit_plan writes, by dir

    def enabled(self, ctx: StageContext) -> bool:
        setting = ctx.cfg.noise.get("enabled", None)
        return bool(noise_consumers(ctx)) if setting is None else bool(setting)

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.noise
        check_split_fractions("noise", c)
        for key in ("clip_seconds", "piece_seconds"):
            if float(c[key]) <= 0:
                raise ConfigError(f"noise.{key}={c[key]}: must be positive")
        if not 0 < float(c.min_piece_seconds) <= float(c.piece_seconds):
            raise ConfigError(f"noise.min_piece_seconds={c.min_piece_seconds}: between 0 and piece_seconds")
        if int(c.clips_per_shard) < 1 or int(c.files_per_shard) < 1:
            raise ConfigError("noise.clips_per_shard and noise.files_per_shard must be >= 1")
        for category, talkers in (c.corpus_categories or {}).items():
            if not CATEGORY_NAME.match(str(category)) or int(talkers) < 0:
                raise ConfigError(f"noise.corpus_categories: {category}: {talkers}: a category name and "
                                  "a number of talkers (0 = not made)")
        unknown = set(c.corpus_clips or {}) - set(SPLITS)
        if unknown or any(int(v) < 0 for v in (c.corpus_clips or {}).values()):
            raise ConfigError(f"noise.corpus_clips={dict(c.corpus_clips)}: clip counts (>= 0) of train, valid, test")
        for entry in c.dirs:
            category, path = parse_dir_entry(entry)
            if not path.is_dir():
                raise ConfigError(f"noise.dirs: {path}: no such directory")
        if not 0 <= float(c.max_failure_rate) <= 1:
            raise ConfigError(f"noise.max_failure_rate={c.max_failure_rate}: a share between 0 and 1")
        makes_clips = corpus_categories(c) and any(int(v) for v in (c.corpus_clips or {}).values())
        if not (c.dirs or makes_clips):
            raise ConfigError("noise: nothing to make (noise.corpus_categories / noise.corpus_clips make no "
                              "clip and noise.dirs lists no folder)")

    # -- plan -------------------------------------------------------------------------------------
    def prepare(self, ctx: StageContext, commit: bool) -> list[str]:
        out = noise_dir(ctx)
        self._uncommitted.pop(str(out), None)
        self._to_write.pop(str(out), None)
        inputs = scan_inputs(ctx)
        frozen = _read_index(out)
        if frozen is not None and frozen["fingerprint"] == inputs["fingerprint"]:
            return []
        if frozen is not None and not ctx.force:
            settings = inputs["settings"]
            changed = sorted(k for k in settings if frozen.get("settings", {}).get(k) != settings[k])
            what = (f"settings {', '.join('noise.' + k for k in changed)}" if changed
                    else "the manifest, the layout or the noise folders")
            raise ConfigError(
                f"noise: {out} was made from other inputs ({what} changed since); rebuild it with "
                "`--stage noise --force` (models trained on the old noise keep it)")
        plan = build_plan(ctx, inputs)
        lines = [f"plan: {sum(len(s['jobs']) for s in plan['shards'] if s['key'].startswith('corpus'))} corpus "
                 f"clips and {sum(len(s['jobs']) for s in plan['shards'] if s['key'].startswith('files'))} noise "
                 f"files in {len(plan['shards'])} shards; categories {', '.join(plan['categories']) or 'none'}"]
        lines += plan["notes"]
        self._uncommitted[str(out)] = plan
        if commit:
            self._to_write[str(out)] = plan
        return lines

    def commit_plan(self, ctx: StageContext) -> None:
        out = noise_dir(ctx)
        plan = self._to_write.pop(str(out), None)
        if plan is None:
            return
        if out.exists():
            _discard(out)
        for shard in plan["shards"]:
            atomic.write_json(out / "plan" / f"{shard['key']}.json", shard)
        index = {k: v for k, v in plan.items() if k != "shards"}
        index["shards"] = [{"key": s["key"], "jobs": len(s["jobs"])} for s in plan["shards"]]
        atomic.write_json(out / "plan" / "index.json", index)  # last: the plan exists once this does
        self._uncommitted.pop(str(out), None)  # the plan on disk is the plan now

    def _index(self, ctx: StageContext) -> dict:
        out = noise_dir(ctx)
        # a plan of this launch not written yet comes first (it replaces one of other inputs)
        index = self._uncommitted.get(str(out)) or _read_index(out)
        if index is None:
            raise InputsMissing(f"{out / 'plan' / 'index.json'}: the noise stage has not been planned")
        return index

    def shards(self, ctx: StageContext) -> list[Shard]:
        keys = [s["key"] for s in self._index(ctx)["shards"]]
        return [Shard(i, len(keys), key) for i, key in enumerate(keys)]

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        return [noise_dir(ctx) / "results" / f"{shard.key}.jsonl"]

    # -- run --------------------------------------------------------------------------------------
    def run(self, ctx: StageContext, shard: Shard) -> dict:
        out = noise_dir(ctx)
        c = ctx.cfg.noise
        jobs = json.loads((out / "plan" / f"{shard.key}.json").read_text())["jobs"]
        t0 = time.time()
        records = []
        for job in jobs:
            try:
                if job["kind"] == "corpus":
                    records += make_corpus_clip(job, out, c, reuse=not ctx.force)
                else:
                    records += make_file_pieces(job, out, c)
            except Exception as e:  # a bad recording never stops the shard ...
                raise_if_infrastructure(e, [out])  # ... but a full disk or a signal does
                source = job.get("source") or job["out"]
                reason = str(e) if source in str(e) else f"{source}: {type(e).__name__}: {e}"
                log.warning("noise: %s", reason)
                records.append({"status": "failed", "category": job["category"], "source": source, "reason": reason})
        with atomic.atomic_open(self.outputs(ctx, shard)[0]) as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        ok = [r for r in records if r["status"] == "ok"]
        return {"jobs": len(jobs), "clips": len(ok), "failed": sum(r["status"] == "failed" for r in records),
                "skipped": sum(r["status"] == "skipped" for r in records),
                "seconds_of_noise": round(sum(r["n_samples"] for r in ok) / 16000, 1),
                "wall_s": round(time.time() - t0, 1)}

    # -- finalize ---------------------------------------------------------------------------------
    def final_outputs(self, ctx: StageContext) -> list[Path]:
        out = noise_dir(ctx)
        return [out / f"{s}.tsv" for s in SPLITS] + [out / "failures.jsonl", out / "summary.json"]

    def finalize(self, ctx: StageContext, shard_stats: dict) -> dict:
        out = noise_dir(ctx)
        index = self._index(ctx)
        clips = {(cat, s): [] for cat in index["categories"] for s in SPLITS}
        failures, skipped, n_files, failed_files = [], 0, 0, set()
        for shard in index["shards"]:
            for line in (out / "results" / f"{shard['key']}.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if rec["status"] == "ok":
                    if not (out / rec["path"]).is_file():
                        raise StageFailed(f"noise: {out / rec['path']} is listed in results/{shard['key']}.jsonl "
                                          "but missing; rerun with --stage noise --force")
                    clips[(rec["category"], rec["split"])].append(rec)
                elif rec["status"] == "failed":
                    failures.append(rec)
                    failed_files.add(rec["source"])
                else:
                    skipped += 1
        n_files = sum(s["jobs"] for s in index["shards"] if s["key"].startswith("files"))
        rate = len(failed_files) / n_files if n_files else 0.0
        if rate > float(ctx.cfg.noise.max_failure_rate):
            raise StageFailed(
                f"noise: {len(failed_files)} of {n_files} noise files failed ({rate:.0%} > noise.max_failure_rate="
                f"{ctx.cfg.noise.max_failure_rate}); first reasons:\n  "
                + "\n  ".join(f["reason"] for f in failures[:10]) + f"\nall failures are in {out / 'results'}/*.jsonl")
        summary = {"categories": {}, "failures": len(failures), "skipped": skipped,
                   "fingerprint": index["fingerprint"], "notes": index["notes"]}
        for split in SPLITS:
            every = []
            for category in index["categories"]:
                recs = sorted(clips[(category, split)], key=lambda r: r["path"])
                every += recs
                atomic.write_text(out / category / f"{split}.tsv",
                                  "".join(_list_line(r, Path(r["path"]).relative_to(category).as_posix()) for r in recs))
                summary["categories"].setdefault(category, {})[split] = {
                    "clips": len(recs), "seconds": round(sum(r["n_samples"] for r in recs) / 16000, 1)}
            atomic.write_text(out / f"{split}.tsv", "".join(_list_line(r, r["path"]) for r in every))
        atomic.write_text(out / "failures.jsonl", "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
        atomic.write_json(out / "summary.json", summary)
        return {"categories": {c: {s: v["clips"] for s, v in per.items()} for c, per in summary["categories"].items()},
                "failures": len(failures), "skipped": skipped}


def _list_line(record: dict, path: str) -> str:
    """A noise list line: the wav, then the talkers of a corpus clip, each the directory of an
    utterance id, as ``avhubert.dataset.talker_key`` reads an id (not imported: importing the plugin
    loads fairseq, seconds per shard process); the dataset then never mixes an utterance with a
    clip holding its own talker."""
    talkers = sorted({u.rpartition("/")[0] or u for u in record.get("utterances", [])})
    return "\t".join([path, *talkers]) + "\n"


def _read_index(out: Path) -> Optional[dict]:
    path = out / "plan" / "index.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _discard(out: Path) -> None:
    """Remove an earlier plan and its outputs: renamed away in one step first, so nothing ever
    sees a mix of the old and the new noise."""
    trash = out.with_name(f".discarded-{os.getpid()}-{out.name}")
    os.replace(out, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------- per job


def _write_wav(path: Path, samples) -> None:
    import soundfile as sf

    with atomic.atomic_path(path) as tmp:
        sf.write(str(tmp), samples, 16000, format="WAV", subtype="PCM_16")


def _ok(category: str, split: str, path: str, n_samples: int, **provenance) -> dict:
    return {"status": "ok", "category": category, "split": split, "path": path, "n_samples": int(n_samples),
            **provenance}


def make_corpus_clip(job: dict, out: Path, c, reuse: bool = True) -> List[dict]:
    """One corpus-noise clip: talker streams of the planned utterances, summed and normalised.
    With ``reuse`` a clip already there (written by an earlier, killed run of this shard: the same
    plan, so the same bytes) is kept."""
    import soundfile as sf

    path = out / job["out"]
    ids = sorted({u[0] for t in job["talkers"] for u in t["utterances"]})
    if not (reuse and path.is_file()):
        streams = []
        for talker in job["talkers"]:
            waves = []
            for _, wav_path in talker["utterances"]:
                wav, sr = sf.read(wav_path, dtype="int16")
                if sr != 16000 or wav.ndim != 1:
                    raise ValueError(f"{wav_path}: expected 16 kHz mono audio, got {sr} Hz {wav.shape}")
                waves.append(wav)
            streams.append(talker_stream(waves, job["length"], float(c.level_db), talker["offset"]))
        _write_wav(path, babble(streams, float(c.level_db)))
    return [_ok(job["category"], job["split"], job["out"], sf.info(str(path)).frames, utterances=ids)]


def make_file_pieces(job: dict, out: Path, c) -> List[dict]:
    """The pieces of one noise recording, 16 kHz mono, each loudness-normalised."""
    samples = load_mono_16k(job["source"])
    bounds = cut_pieces(len(samples), int(round(float(c.piece_seconds) * 16000)),
                        int(round(float(c.min_piece_seconds) * 16000)))
    if not bounds:
        return [{"status": "skipped", "category": job["category"], "source": job["source"],
                 "reason": f"{len(samples) / 16000:.1f} s, shorter than noise.min_piece_seconds={c.min_piece_seconds}"}]
    splits = [job["split"]] * len(bounds)
    if job["split"] is None:  # a category of one or two recordings: split in time
        n_train, n_valid, _ = split_counts(len(bounds), float(c.valid_fraction), float(c.test_fraction))
        splits = ["train" if k < n_train else "valid" if k < n_train + n_valid else "test" for k in range(len(bounds))]
    records = []
    for k, ((start, stop), split) in enumerate(zip(bounds, splits)):
        piece = samples[start:stop]
        rel = f"{job['out']}-{k:03d}.wav"
        if not math.isfinite(loudness_db(piece)):
            records.append({"status": "skipped", "category": job["category"], "source": job["source"],
                            "reason": f"piece {k} ({start / 16000:.1f}-{stop / 16000:.1f} s) is silent"})
            continue
        _write_wav(out / rel, to_int16(normalise_loudness(piece, float(c.level_db))))
        records.append(_ok(job["category"], split, rel, stop - start, source=job["source"]))
    return records


STAGE = NoiseStage()
