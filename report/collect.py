"""Everything the report shows, read from a work dir (complete, partial or failed; any size): with
its readers ``crop_scan.py`` (the crop records), ``steps.py`` (the engine's markers) and ``disk.py``
(disk use), the only modules of the report that read the work dir's files.

``read_run`` reads what every section shares (the config, the engine's markers, the crop scan, the
launches); each ``*_section(run)`` reads one section's own files and returns plain data (dicts,
lists, numbers, strings, PNG/JPEG bytes, the dataclasses below) for its template
(``report/templates/sections/<anchor>.html``), or None where the section has nothing to show.
A section that finds a problem the user must see adds it with ``run.problem`` (the page's "Needs
attention" list). Text is never HTML here: the templates escape everything.

Every reader costs O(shards) or O(files it must show), never O(items): the crop records, one per
item, are summarised per shard into a cache (report/crop_scan.py).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

from omegaconf import OmegaConf

from avprep import quality
from pipeline.changes import read_saved
from pipeline.lock import describe_owner, lock_holder
from pipeline.progress import run_progress
from pipeline.state import StateStore
from pipeline.status import run_driven
from report.crop_scan import CropScan, SheetCache, scan_crop
from report.disk import disk_usage
from report.files import CROP_CACHE, FLAGGED_TSV, LAUNCHES, REPORT_DIR
from report.format import fmt_num
from report.steps import StepInfo, collect_steps
from speechfeat.wer import word_errors
from stages import STAGE_ORDER

log = logging.getLogger(__name__)

FLAGGED_SHOWN = 40  # flagged items shown with their tiles (all of them are in flagged.tsv)
SAMPLE_ITEMS = 24  # items on the corpus sample sheet (one per shard, shards spread evenly)
FAILED_SHOWN = 50  # failed shards listed
HYPOTHESES_SHOWN = 5  # per split
REASONS_SHOWN = 15  # crop failure reasons listed
UNIT_FAILURES_SHOWN = 10  # utterances without units listed per units run
NOISE_SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------------------------ page parts
# Pieces of a sentence that the page shows in their own style (a "Needs attention" line is a tuple
# of plain strings and these); the templates render each kind (macros.html ``rich``).
@dataclass(frozen=True)
class Code:
    """Shown as code: an error line, a setting."""
    text: object
    kind = "code"


@dataclass(frozen=True)
class FilePath:
    """A path as the user finds it (not a link: it may not be reachable from the report)."""
    text: object
    kind = "path"


@dataclass(frozen=True)
class Anchor:
    """A link to a part of the page (``#anchor``)."""
    anchor: str
    text: str
    kind = "anchor"


@dataclass(frozen=True)
class Link:
    """A link to a file, relative to the report (it works wherever the work dir is mounted)."""
    href: str
    text: str
    kind = "link"


@dataclass(frozen=True)
class Broken:
    """A part whose files could not be read or make no sense: one line naming them and the error."""
    where: str
    error: str  # the exception's type
    message: str
    kind = "broken"


@dataclass
class Run:
    """What every section shares: the work dir's config, steps, crop scan and launches; and the
    problems found so far (the page's "Needs attention" list, in the order found)."""
    workdir: Path
    out_dir: Path  # WORKDIR/report
    cfg: Optional[dict]  # the last launch's resolved config (None: not recorded)
    bounds: quality.QualityBounds
    steps: List["StepInfo"]
    crop: Optional["CropScan"]
    launches: List[dict]  # the last 20, oldest first
    launch: Optional[dict]  # this launch (or the last recorded one)
    iterations: List[int]
    units_dirs: List[Path]
    problems: List[tuple] = field(default_factory=list)
    under_way: Optional[str] = None  # the launch that holds the work dir now (a refresh during it)

    def problem(self, *parts) -> None:
        """A line for "Needs attention": plain strings and Code/FilePath/Anchor/Link parts."""
        self.problems.append(parts)

    def link(self, path: Path, text: Optional[str] = None) -> Link:
        return Link(os.path.relpath(path, self.out_dir), str(path) if text is None else text)

    def step(self, stage: str) -> Optional["StepInfo"]:
        """The first recorded step of ``stage`` (any iteration)."""
        return next((s for s in self.steps if s.stage == stage), None)

    @property
    def state(self) -> str:
        """complete | failed | running | incomplete | empty."""
        if not self.steps:
            return "empty"
        last_failed = self.launch and self.launch.get("rc") not in (None, 0) and not self.under_way
        if any(s.state == "failed" for s in self.steps) or last_failed:
            return "failed"
        if self.under_way or any(s.state == "running" for s in self.steps):
            return "running"
        if all(s.state == "complete" for s in self.steps):
            return "complete"
        return "incomplete"

    @property
    def outputs(self) -> List[tuple]:
        """(what, path) of the main outputs: the last pretrained checkpoint, every k-means model,
        the fine-tuned checkpoint and its results, the units of a finished units run."""
        w, out = self.workdir, []
        finals = [w / f"iter{i}" / "train" / "checkpoints" / "checkpoint_final.pt" for i in self.iterations]
        done = [p for p in finals if p.exists()]
        if done:
            out.append(("final pretrained checkpoint", done[-1]))
        for i in self.iterations:
            km = w / f"iter{i}" / "kmeans" / "kmeans.joblib"
            if km.exists():
                out.append((f"k-means model, iteration {i}", km))
        out.append(("fine-tuned checkpoint", w / "finetune" / "checkpoints" / "checkpoint_final.pt"))
        out.append(("fine-tuning results", w / "finetune" / "results.json"))
        for d in self.units_dirs:
            if (d / "summary.json").is_file():
                out.append(("units", d))
        return out


def read_run(workdir: Path, launch: Optional[dict] = None) -> Run:
    """What every section shares (``launch``: this launch's record; default the last recorded).
    The crop scan refreshes its cache in ``WORKDIR/report/``, which must exist."""
    workdir = Path(workdir).resolve()
    out_dir = workdir / REPORT_DIR
    cfg = load_config(workdir)
    bounds = quality_bounds(cfg)
    launches = read_launches(out_dir / LAUNCHES)
    if launch is None and launches:
        launch = launches[-1]
    run = Run(workdir, out_dir, cfg, bounds, steps=collect_steps(workdir, list(STAGE_ORDER)),
              crop=scan_crop(workdir / "crop", out_dir / CROP_CACHE, bounds), launches=launches, launch=launch,
              iterations=iterations_present(workdir, int((cfg or {}).get("iterations") or 0)),
              units_dirs=units_dirs(workdir, cfg), under_way=launch_under_way(workdir) if launch is None else None)
    if launch and launch.get("rc") not in (None, 0) and not run.under_way:
        first = (launch.get("error") or f"exit status {launch.get('rc')}").strip().splitlines()[0]
        run.problem("the last launch failed: ", Code(first), " (", Anchor("launch", "details"), ")")
    return run


def launch_under_way(workdir: Path) -> Optional[str]:
    """Who drives the run now, as ``status`` decides it (the page is a refresh during a launch:
    the last recorded launch is an earlier one), else None."""
    if not run_driven(workdir):
        return None
    owner, _ = lock_holder(workdir)
    return describe_owner(owner) if isinstance(owner, dict) else "the detached driver"


def guarded(run: Run, source: str, anchor: str, read: Callable, *args) -> Union[object, Broken]:
    """``read(*args)``, or where its files (``source``, as the user finds them) cannot be read or
    make no sense, a Broken line (also a problem linking to ``anchor``): the rest of the page stands."""
    try:
        return read(*args)
    except Exception as e:  # noqa: BLE001 - a view of whatever is on disk; never the launch's failure
        return broken(run, source, anchor, e)


def broken(run: Run, source: str, anchor: str, error: BaseException) -> Broken:
    log.debug("report: %s failed", source, exc_info=error)
    where = str(getattr(error, "filename", None) or source)
    run.problem("the report could not read ", FilePath(where), " (", Anchor(anchor, type(error).__name__), ")")
    return Broken(where, type(error).__name__, str(error)[:300])


# ------------------------------------------------------------------------------------ stage outputs
def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def iterations_present(workdir: Path, configured: int) -> List[int]:
    found = {int(p.name[4:]) for p in workdir.glob("iter*") if p.name[4:].isdigit()}
    return sorted(found | set(range(1, configured + 1)))


def loss_series(tensorboard_dir: Path) -> dict:
    """``{"train": [(update, loss)], "valid": [...]}`` from fairseq's TensorBoard logs (the train
    stage's reader: a record cut by a kill ends its file, a step logged again keeps its latest)."""
    from stages.tensorboard import read_scalars

    if not tensorboard_dir.is_dir():
        return {}
    out = {}
    try:
        train = read_scalars(tensorboard_dir / "train_inner").get("loss", []) or \
            read_scalars(tensorboard_dir / "train").get("loss", [])
        valid = read_scalars(tensorboard_dir / "valid").get("loss", [])
    except Exception as e:  # a damaged log must not cost the whole report
        log.warning("report: cannot read %s: %s", tensorboard_dir, e)
        return {}
    if train:
        out["train"] = [(s, v) for s, v, *_ in train]
    if valid:
        out["valid"] = [(s, v) for s, v, *_ in valid]
    return out


def count_lines(path: Path) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def read_listing(items_dir: Path) -> Optional[dict]:
    """The frozen item list and what the last listing found (``stages/item_list.py``): from
    ``index.json`` the frozen items, shards and batches (a few numbers per batch), from
    ``listing.json`` the counts, the first removed/changed ids and the per-item problems. None
    when the crop stage has not frozen a list here. Raises ValueError for a malformed file."""
    index_path, listing_path = items_dir / "index.json", items_dir / "listing.json"
    if not index_path.is_file() and not listing_path.is_file():
        return None
    out: dict = {"dir": items_dir}
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        batches = index.get("batches") or []
        out.update({"corpus": index.get("corpus"), "layout": index.get("layout"), "batches": len(batches),
                    "frozen": sum(int(b.get("items", 0)) for b in batches),
                    "shards": sum(len(b.get("shards") or []) for b in batches)})
    if listing_path.is_file():
        listing = json.loads(listing_path.read_text())
        if not isinstance(listing, dict):
            raise ValueError(f"{listing_path}: not a JSON object")
        out["listing"] = listing
    return out


def units_dirs(workdir: Path, cfg: Optional[dict]) -> List[Path]:
    """Where units runs of this work dir are: ``units.out_dir`` of the last launch's config (it
    may lie outside the work dir) and ``WORKDIR/units``, those holding a units run's files."""
    configured = ((cfg or {}).get("units") or {}).get("out_dir")
    candidates = ([Path(str(configured)).expanduser()] if configured else []) + [workdir / "units"]
    out = []
    for d in candidates:
        d = d if d.is_absolute() else workdir / d
        if d not in out and any((d / f).exists() for f in ("summary.json", "settings.json", "shards")):
            out.append(d)
    return out


def quality_bounds(cfg: Optional[dict]) -> quality.QualityBounds:
    """The bounds of the last launch's config (the crop stage's ``crop.quality``)."""
    return quality.bounds_of(((cfg or {}).get("crop") or {}).get("quality"))


def load_config(workdir: Path) -> Optional[dict]:
    """The last launch's resolved config (``.pipeline/config.yaml``); None when not recorded or not
    readable (the report then shows what it can without it)."""
    p = workdir / ".pipeline" / "config.yaml"
    if not p.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:
        log.warning("report: cannot read %s: %s", p, e)
        return None


def read_launches(path: Path) -> List[dict]:
    """The last 20 launches of ``report/launches.jsonl`` (a line that is not JSON is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out[-20:]


def done_stats(workdir: Path, stage: str) -> Optional[dict]:
    """The stats of a once-only, one-shard step's done marker (units_kmeans)."""
    store = StateStore(workdir)
    keys = sorted(store.markers(stage, None)["done"])
    m = store.read_done(stage, None, keys[0]) if keys else None
    return (m or {}).get("stats") or None


# ---------------------------------------------------------------------------------------- sections
# One function per section of the page, in page order: plain data for its template
# (templates/sections/<anchor>.html), or None where the section has nothing to show. Anything one
# raises becomes the section's one-line "could not be built" (report/build.py).
def overview_section(run: Run) -> dict:
    """The cards (crop, manifest, iterations, WER, failed shards, free disk) and the main outputs;
    the problems of the crop and of every failed or incomplete step."""
    scan, workdir = run.crop, run.workdir
    crop = None
    if scan:
        crop = {"total": scan.items, "ok": scan.ok, "failed": scan.failed,
                "failed_share": scan.failed / scan.items if scan.items else 0, "flagged": scan.n_flagged,
                "with_quality": scan.with_quality, "flagged_share": scan.n_flagged / max(scan.with_quality, 1)}
        if scan.failed:
            run.problem(f"{scan.failed:,} of {scan.items:,} items failed to crop: ", Anchor("crop-failures", "reasons"))
        if scan.n_flagged:
            run.problem(f"{scan.n_flagged:,} cropped items are flagged by the quality bounds: ",
                        Anchor("flagged", "see them"), " (they stay in the manifest)")
    summary = read_json(workdir / "manifest" / "summary.json")
    manifest = None
    if summary:
        counts = summary.get("counts", {})
        manifest = {"utterances": sum(counts.values()), "per_split": sorted(counts.items())}
    configured = int((run.cfg or {}).get("iterations") or 0)
    trained = [i for i in run.iterations
               if (workdir / f"iter{i}" / "train" / "checkpoints" / "checkpoint_final.pt").exists()]
    results = read_json(workdir / "finetune" / "results.json")
    wer = None
    if results:
        wers = {k: v.get("wer") for k, v in (results.get("splits") or {}).items()}
        wer = {"main": wers.get("test", wers.get("valid")), "per_split": [(k, v) for k, v in wers.items() if v is not None]}
    failed_steps = [s for s in run.steps if s.failed]
    for s in failed_steps:
        run.problem(f"{s.name}: {len(s.failed)} shard(s) failed, e.g. ", Code(s.failed[0][2]), " (log ",
                    FilePath(s.failed[0][1]), ")")
    for s in run.steps:
        if s.state == "incomplete":
            run.problem(f"{s.name} is incomplete: {s.done:,}/{fmt_num(s.total)} shards done"
                        + ("" if s.done != s.total else ", not finalized"))
    try:
        usage = shutil.disk_usage(workdir)
        disk = {"free": usage.free, "free_share": usage.free / usage.total if usage.total else 1}
    except OSError:
        disk = None
    return {"crop": crop, "manifest": manifest,
            "iterations": {"trained": len(trained), "configured": configured or len(run.iterations)},
            "wer": wer, "failed": {"shards": sum(len(s.failed) for s in failed_steps),
                                   "steps": ", ".join(sorted({s.name for s in failed_steps}))[:120]} if failed_steps else None,
            "disk": disk, "outputs": [(what, p, Path(p).exists()) for what, p in run.outputs]}


def progress_section(run: Run) -> Optional[dict]:
    """The last launch's steps as the engine times them (pipeline/progress.py, what ``status``
    prints): per step shards done, failed, running, pending, one shard's time and the time left,
    and the launch's ETA, each saying whether it is measured or the plan's estimate."""
    prog = run_progress(run.workdir, run.steps)
    if not prog.steps:
        return None
    steps = [{"stage": s.stage, "iteration": s.iteration, "state": s.state, "done": s.done, "total": s.total,
              "failed": s.failed, "running": s.running, "pending": s.pending, "shard_s": s.shard_s,
              "eta_s": s.eta_s, "basis": s.basis} for s in prog.steps]
    left = [s for s in prog.steps if not s.complete]
    return {"steps": steps, "left": len(left), "started": prog.started, "as_of": prog.as_of, "under_way": run.under_way,
            "eta_s": prog.eta_s, "basis": prog.basis, "unknown": prog.unknown,
            "ends": None if prog.eta_s is None else prog.as_of + prog.eta_s}


def stages_section(run: Run) -> dict:
    """Every recorded step (shards, state, times, its settings digest linked to its
    provenance.json, changed when the last launch's settings differ), the job time per step for
    the chart and the notes of the last launch's settings comparison (other versions)."""
    timed = [s for s in run.steps if s.job_seconds]
    if len(timed) < 3:  # one or two bars say nothing the table does not
        timed = []
    provenance = {}
    for s in run.steps:
        if s.provenance and s.settings_digest:
            provenance[s.name] = run.link(run.workdir / s.provenance, s.settings_digest)
        if s.changed:
            run.problem(f"{s.name} was made with other settings than the last launch's (", Code(s.changed),
                        "): ", Code("--redo-changed"), " redoes it and what reads it (", Anchor("stages", "stages"), ")")
    notes = [line for line in read_saved(run.workdir).get("lines") or [] if line.startswith("note:")]
    return {"steps": run.steps, "job_names": [s.name for s in timed], "job_seconds": [s.job_seconds for s in timed],
            "provenance": provenance, "notes": notes}


def crop_section(run: Run) -> dict:
    """The corpus listing, the crop counts, failure reasons, rotations, the quality flags with
    their bounds and histograms, the flagged items with their tiles (all of them for flagged.tsv)
    and the corpus sample sheet."""
    workdir, scan, bounds = run.workdir, run.crop, run.bounds
    sheets_dir = workdir / "crop" / "sheets"
    data = {"listing": guarded(run, "crop/items/index.json, listing.json", "crop", listing_part, run), "scan": scan}
    if scan is None:
        return data
    data.update(
        failed_share=scan.failed / scan.items if scan.items else 0, hours=scan.frames / 25 / 3600,
        splits=sorted(scan.splits.items()),
        rotations=sorted(scan.rotations.items(), key=lambda x: int(x[0])), rotated_examples=scan.rotated_examples[:5],
        reasons=[(n, g) + tuple(scan.reason_examples.get(g, ["", ""])) for g, n in scan.reasons.most_common(REASONS_SHOWN)],
        more_reasons=len(scan.reasons) - REASONS_SHOWN, results_dir=str(workdir / "crop" / "results"),
        sheets=run.link(sheets_dir, str(sheets_dir) + "/") if sheets_dir.is_dir() else None, quality=None)
    if not scan.with_quality:
        return data
    flags = []
    for code, (figure, attr, kind, meaning) in quality.FLAGS.items():
        n = scan.flag_counts.get(code, 0)
        flags.append({"code": code, "meaning": meaning, "figure": figure, "kind": kind, "setting": attr,
                      "bound": getattr(bounds, attr), "count": n, "share": n / scan.with_quality})
    flagged = sorted(scan.flagged, key=lambda f: (f["shard"], f.get("sheet_index") or 0))
    sheets = SheetCache(sheets_dir, bounds.sheet_frames)
    shown = []
    for f in pick_flagged(flagged, FLAGGED_SHOWN):  # spread over the kinds of flag
        tile = sheets.cell(f["shard"], f.get("sheet_index"))
        shown.append({"id": f["id"], "split": f.get("split", ""), "tile": None if tile is None else jpeg(tile),
                      "flags": [quality.describe_flag(c, f["q"], bounds) for c in f["flags"]],
                      "sheet": run.link(sheets_dir / f"{f['shard']}.png", f["shard"])})
    data["quality"] = {"flags": flags, "enabled": bounds.enabled, "hist": scan.hist, "bounds": bounds,
                       "flagged": flagged, "shown": shown, "sample": sample_sheet(scan, sheets),
                       "flagged_tsv": run.link(run.out_dir / FLAGGED_TSV, FLAGGED_TSV)}
    return data


def listing_part(run: Run) -> Optional[dict]:
    """The frozen item list and what the last listing of the corpus found (crop/items/)."""
    info = read_listing(run.workdir / "crop" / "items")
    if info is None:
        return None
    idir = info["dir"]
    out = {"frozen": None, "listing": None}
    if "frozen" in info:
        out["frozen"] = {"link": run.link(idir, "crop/items/"), "frozen": info["frozen"], "shards": info["shards"],
                         "batches": info["batches"], "corpus": info.get("corpus"), "layout": info.get("layout")}
    listing = info.get("listing")
    if listing is None:
        return out
    removed, changed = int(listing.get("removed") or 0), int(listing.get("changed") or 0)
    kinds = listing.get("problems") or {}
    problems = [{"kind": kind, "count": int(p.get("count") or 0), "examples": list(p.get("examples") or [])}
                for kind, p in sorted(kinds.items())]
    out["listing"] = {
        "counts": [listing.get(k) for k in ("listed", "frozen_before", "new", "replanned")] + [removed, changed],
        "removed": removed, "removed_examples": list(listing.get("removed_examples") or []),
        "removed_list": run.link(idir / "removed.txt", "removed.txt"),
        "changed": changed, "changed_examples": [tuple(x) for x in listing.get("changed_examples") or []],
        "changed_list": run.link(idir / "changed.txt", "changed.txt"), "problems": problems,
        # every corpus path that is not an item (stages/corpus.py IGNORED_KINDS)
        "ignored": [{"kind": kind, "count": int(p.get("count") or 0), "examples": list(p.get("examples") or [])}
                    for kind, p in (listing.get("ignored") or {}).items()],
        "ignored_total": int(listing.get("ignored_total") or 0),
        "ignored_list": run.link(idir / "ignored.tsv", "ignored.tsv")}
    if removed or changed:
        run.problem(f"the last corpus listing found {removed:,} gone and {changed:,} changed source(s): ",
                    Anchor("crop", "see the listing"))
    if problems:
        total = sum(p["count"] for p in problems)
        run.problem(f"{total:,} item(s) of the corpus cannot be used as listed ("
                    + ", ".join(p["kind"] for p in problems) + "): ", Anchor("crop", "listing problems"))
    return out


def pick_flagged(flagged: List[dict], n: int) -> List[dict]:
    """At most ``n`` flagged items spread over the kinds of flag: the first item of each code, then
    the next of each, and so on."""
    by_code: dict = {}
    for f in flagged:
        by_code.setdefault(f["flags"][0], []).append(f)
    shown, seen = [], set()
    while len(shown) < min(n, len(flagged)):
        progressed = False
        for items in by_code.values():
            while items and id(items[0]) in seen:
                items.pop(0)
            if items and len(shown) < n:
                f = items.pop(0)
                shown.append(f)
                seen.add(id(f))
                progressed = True
        if not progressed:
            break
    return shown


def jpeg(image) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return buf.tobytes() if ok else b""


def sample_sheet(scan: CropScan, sheets: SheetCache) -> Optional[dict]:
    """The corpus sample sheet: SAMPLE_ITEMS items' cells spread over the shards, as JPEG bytes
    (``jpeg``) with the number of items on it (``count``); None where no shard has a sheet."""
    samples = sorted(scan.samples, key=lambda s: (s["shard"], s["sheet_index"]))
    if not samples:
        return None
    n = min(SAMPLE_ITEMS, len(samples))
    picked = [samples[i * len(samples) // n] for i in range(n)]  # spread over the shards
    cells = [c for c in (sheets.cell(s["shard"], s["sheet_index"]) for s in picked) if c is not None]
    if not cells:
        return None
    size = cells[0].shape[:2]
    cells = [c for c in cells if c.shape[:2] == size]
    return {"jpeg": jpeg(quality.compose_cells(cells, columns=3)), "count": len(cells)}


def manifest_section(run: Run) -> dict:
    """Utterances, frames and hours per split, whether transcripts exist, the summary's notes."""
    mdir = run.workdir / "manifest"
    summary = read_json(mdir / "summary.json")
    if summary is None and not mdir.is_dir():
        return {"ran": False}
    counts = (summary or {}).get("counts") or {}
    frames = (summary or {}).get("frames") or {}
    splits = []
    for split in ("train", "valid", "test"):
        n = counts.get(split)
        if n is None:
            lines = count_lines(mdir / f"{split}.tsv")
            n = None if lines is None else max(lines - 1, 0)  # the first line is the root
        fr = frames.get(split)
        splits.append({"split": split, "utterances": n, "frames": fr, "hours": None if fr is None else fr / 25 / 3600,
                       "transcripts": (mdir / f"{split}.wrd").exists()})
    failures = count_lines(mdir / "failures.jsonl")
    keys = ("failures", "not_cropped", "not_in_corpus", "spm_model", "spm_vocab_size")
    return {"ran": True, "splits": splits, "facts": [(k, summary[k]) for k in keys if k in (summary or {})],
            "failures": failures or 0, "failures_file": run.link(mdir / "failures.jsonl", "failures.jsonl")}


def noise_section(run: Run) -> Optional[dict]:
    """The noise stage's clips per category and split (noise/summary.json), its failures and notes;
    None where this run uses no noise of its own."""
    ndir = run.workdir / "noise"
    step = run.step("noise")
    if not ndir.is_dir() and step is None:
        return None
    path = ndir / "summary.json"
    if not path.is_file():
        return {"finished": False, "step": step}
    summary = json.loads(path.read_text())

    def lists(d: Path) -> List[Link]:
        return [run.link(d / f"{sp}.tsv", sp) for sp in NOISE_SPLITS if (d / f"{sp}.tsv").is_file()]

    categories, totals = [], {sp: [0, 0.0] for sp in NOISE_SPLITS}
    for category, per in sorted(summary["categories"].items()):
        cells = []
        for sp in NOISE_SPLITS:
            c = per.get(sp) or {}
            clips, seconds = int(c.get("clips") or 0), float(c.get("seconds") or 0.0)
            totals[sp][0] += clips
            totals[sp][1] += seconds
            cells.append((clips, seconds))
        categories.append({"name": category, "splits": cells, "lists": lists(ndir / category)})
    failures = int(summary.get("failures") or 0)
    if failures:
        run.problem(f"{failures:,} noise file(s) could not be read: ", Anchor("noise", "noise"))
    return {"finished": True, "categories": categories, "totals": [tuple(t) for t in totals.values()],
            "lists": lists(ndir), "dir": run.link(ndir, str(ndir) + "/"), "skipped": int(summary.get("skipped") or 0),
            "failures": failures, "failures_file": run.link(ndir / "failures.jsonl", "failures.jsonl"),
            "notes": list(summary.get("notes") or [])}


def iterations_section(run: Run) -> dict:
    """Per iteration the labels' report.json figures, pretraining updates and losses, the loss
    series of every run (and fine-tuning) and the cluster-usage plots the labels stage drew."""
    workdir = run.workdir
    started = [it for it in run.iterations if (workdir / f"iter{it}").is_dir()]
    if not started:
        return {"started": False, "configured": len(run.iterations)}
    labels, metrics, losses, usage = [], [], {}, []
    for it in run.iterations:
        rep = read_json(workdir / f"iter{it}" / "labels" / "report.json")
        if rep:
            target = f"layer {rep['layer']}" if rep.get("layer") is not None else str(rep.get("features", "?"))
            for split, st in (rep.get("splits") or {}).items():
                cp = st.get("char_purity") or {}
                metrics.append({"iteration": it, "split": split, "clusters_used": st.get("clusters_used", 0),
                                "n_clusters": st.get("n_clusters", rep.get("n_clusters", 0)),
                                "entropy_bits": st.get("entropy_bits", 0.0),
                                "max_entropy_bits": st.get("max_entropy_bits", 1.0),
                                "cluster_purity": cp.get("cluster_purity"),
                                "mutual_information_bits": cp.get("mutual_information_bits")})
                labels.append({"iteration": it, "target": target, "k": rep.get("n_clusters"), "split": split,
                               "clusters_used": st.get("clusters_used"), "n_clusters": st.get("n_clusters"),
                               "entropy_bits": st.get("entropy_bits"), "max_entropy_bits": st.get("max_entropy_bits"),
                               "top10_share": st.get("top10_share"), "cluster_purity": cp.get("cluster_purity"),
                               "char_purity": cp.get("char_purity"), "mi_bits": cp.get("mutual_information_bits"),
                               "failed": st.get("failed_utterances"), "mismatches": st.get("duration_mismatches")})
        else:
            labels.append({"iteration": it, "split": None})  # labels not written yet
        series = loss_series(workdir / f"iter{it}" / "train" / "tensorboard")
        if series:
            losses[f"iteration {it}"] = series
        png = workdir / f"iter{it}" / "labels" / "cluster_usage.png"
        if png.is_file():
            usage.append((it, png.read_bytes()))
    ft_series = loss_series(workdir / "finetune" / "tensorboard")
    if ft_series:
        losses["fine-tuning"] = ft_series
    store = StateStore(workdir)
    train_steps = {s.iteration: s for s in run.steps if s.stage == "train"}
    training = []
    for it in run.iterations:
        s = train_steps.get(it)
        done = ((store.read_stage_done("train", it) or {}).get("summary") or {}) if s is not None else {}
        series = losses.get(f"iteration {it}", {})
        tr, va = series.get("train") or [], series.get("valid") or []
        training.append({"iteration": it, "state": s.state if s else "not started",
                         "updates": done.get("num_updates") or (tr[-1][0] if tr else None),
                         "ranks": done.get("world_size"), "first_train_loss": tr[0][1] if tr else None,
                         "last_train_loss": tr[-1][1] if tr else None, "last_valid_loss": va[-1][1] if va else None,
                         "wall_s": done.get("wall_s")})
    return {"started": True, "labels": labels, "metrics": metrics, "training": training, "losses": losses,
            "usage": usage}


def finetune_section(run: Run) -> dict:
    """Fine-tuning's WER per split, the first hypotheses with their word errors, what it was
    trained from and how it decoded, and the WER under noise (results.json)."""
    path = run.workdir / "finetune" / "results.json"
    if not path.is_file():
        return {"written": False}
    res = json.loads(path.read_text())
    splits, hypotheses = [], []
    for split, st in (res.get("splits") or {}).items():
        splits.append({"split": split, "wer": st.get("wer"), "errors": st.get("errors"),
                       "ref_words": st.get("ref_words"), "utterances": st.get("utterances")})
        for hy in (st.get("hypotheses") or [])[:HYPOTHESES_SHOWN]:
            ref, hyp = str(hy.get("ref", "")), str(hy.get("hyp", ""))
            errors, _ = word_errors(ref, hyp)
            hypotheses.append({"split": split, "id": hy.get("id"), "ref": ref, "hyp": hyp, "errors": errors,
                               "words": len(ref.split())})
    noise = None
    if res.get("noise"):
        noise = guarded(run, f'{path} ("noise")', "finetune", noise_wer_part, run, res["noise"])
    generation = res.get("generation") or {}
    chosen = (generation.get("beam"), generation.get("lenpen"))
    grid = [{**row, "chosen": (row.get("beam"), row.get("lenpen")) == chosen} for row in res.get("decode_grid") or []]
    return {"written": True, "splits": splits, "hypotheses": hypotheses, "shown": HYPOTHESES_SHOWN,
            "checkpoint": res.get("checkpoint"), "pretrained": res.get("pretrained"),
            "modalities": res.get("modalities"), "num_updates": res.get("num_updates"),
            "generation": list(generation.items()), "noise": noise,
            # decoding tuned on valid (finetune.decode_grid) and checkpoint averaging (finetune.average_last)
            "decode_grid": grid if len(grid) > 1 else [], "averaging": res.get("averaging")}


def noise_wer_part(run: Run, noise: dict) -> dict:
    """WER per split, input, noise category and SNR (results.json["noise"])."""
    snrs = [f"{float(x):g}" for x in noise.get("snrs") or []]
    table = noise["wer"]
    splits = []
    for split, per_modality in table.items():
        inputs = []
        for modality, cells in per_modality.items():
            categories = [(c, [(cells[c] or {}).get(k) for k in snrs]) for c in cells if c != "clean"]
            inputs.append({"modality": modality, "clean": cells.get("clean"), "categories": categories})
        splits.append({"split": split, "inputs": inputs})
    return {"snrs": snrs, "snr_labels": [f"{k} dB" for k in snrs], "splits": splits, "table": table, "dir": noise.get("dir"), "seed": noise.get("seed"),
            "hypotheses": run.link(run.workdir / "finetune" / "noise_eval", "finetune/noise_eval/"),
            "notes": list(noise.get("notes") or [])}


def units_section(run: Run) -> Optional[dict]:
    """Each units run (units.out_dir): what it was computed from, K, layer, per split the rows
    done and failed, cluster use, and links to its files; None where there is no units run."""
    ustep, kstep = run.step("units"), run.step("units_kmeans")
    if not run.units_dirs:
        return None if ustep is None else {"step": ustep, "runs": []}
    runs = []
    for d in run.units_dirs:
        settings = read_json(d / "settings.json") if (d / "settings.json").is_file() else None
        if (d / "settings.json").is_file() and settings is None:
            raise ValueError(f"{d / 'settings.json'}: not readable JSON")
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        settings = (summary or {}).get("settings") or settings or {}
        kmeans = settings.get("kmeans")
        training = done_stats(run.workdir, "units_kmeans") if kmeans == "trained" and kstep is not None else None
        unit_run = {"dir": run.link(d, str(d) + "/"), "checkpoint": settings.get("checkpoint"),
                    "layer": (summary or {}).get("layer", settings.get("layer")), "modality": settings.get("modality"),
                    "n_clusters": (summary or {}).get("n_clusters"), "kmeans": kmeans,
                    "kmeans_model": settings.get("kmeans_model") or (str(d / "kmeans.joblib") if kmeans == "trained" else None),
                    "kmeans_training": training, "step": ustep, "finished": summary is not None}
        runs.append(unit_run)
        if summary is None:
            continue
        splits, failures = [], []
        for split, st in (summary.get("splits") or {}).items():
            n, failed = int(st.get("utterances") or 0), int(st.get("failed_utterances") or 0)
            splits.append({"split": split, "done": n - failed, "failed": failed, "frames": st.get("frames"),
                           "clusters_used": st.get("clusters_used"), "n_clusters": st.get("n_clusters"),
                           "entropy_bits": st.get("entropy_bits"), "max_entropy_bits": st.get("max_entropy_bits"),
                           "files": [run.link(d / f"{split}.{ext}", f".{ext}") for ext in ("units", "rle", "jsonl")
                                     if (d / f"{split}.{ext}").is_file()]})
            failures += [(split, f.get("id"), f.get("reason")) for f in st.get("failures") or []]
        unit_run.update(splits=splits, failures=failures[:UNIT_FAILURES_SHOWN],
                        files=[run.link(d / f, f) for f in ("dict.units.txt", "summary.json", "settings.json")
                               if (d / f).is_file()],
                        jsonl_key=settings.get("jsonl_key", "hubert"))
        if failures:
            n_failed = sum(s["failed"] for s in splits)
            run.problem(f"{n_failed:,} utterance(s) have no units (empty lines): ", Anchor("units", "units"))
    return {"step": ustep, "runs": runs}


def disk_section(run: Run) -> Optional[dict]:
    """Disk used per stage directory (estimated beyond a file budget); None for an empty work dir."""
    scan = run.crop
    expected = {sub: scan.ok for sub in ("crop/video", "crop/audio", "crop/landmarks")} if scan else {}
    entries = [e for e in disk_usage(run.workdir, expected) if e.files]
    if not entries:
        return None
    return {"entries": entries, "total": sum(e.bytes for e in entries),
            "approximate": any(e.estimated or not e.complete for e in entries)}


def failures_section(run: Run) -> dict:
    """The failed shards (the first FAILED_SHOWN) with their last error line and log."""
    failed = [{"step": s.name, "shard": key, "log": logp, "error": err} for s in run.steps for key, logp, err in s.failed]
    return {"shards": failed[:FAILED_SHOWN], "more": max(len(failed) - FAILED_SHOWN, 0)}


def launch_section(run: Run) -> dict:
    """The last launch (command, times, exit status, error), the earlier ones, the resolved config."""

    def launch(rec: dict) -> dict:
        return {"command": rec.get("command"), "start": rec.get("start"), "end": rec.get("end"), "rc": rec.get("rc"),
                "error": rec.get("error"), "seconds": (rec.get("end") or 0) - (rec.get("start") or 0)}

    last = None
    if run.launch:
        last = launch(run.launch)
        if not run.launch.get("end"):
            last["seconds"] = None
    config = None
    cfg_path = run.workdir / ".pipeline" / "config.yaml"
    if cfg_path.is_file():
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except OSError:
            text = ""
        config = {"path": str(cfg_path), "text": text}
    earlier = [launch(rec) for rec in reversed(run.launches)] if len(run.launches) > 1 else []
    return {"last": last, "earlier": earlier, "config": config}
