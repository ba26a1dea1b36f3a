"""``WORKDIR/report/index.html``: one self-contained page about a work dir (every image inlined,
no script or font from the network, no server), plus ``flagged.tsv`` (every flagged item) and
``crop_sample.jpg`` (the corpus-level sample sheet) beside it.

It works on any work dir: a partial one (only crop done), a failed one (the failed shards with
their logs lead the page) and a 1.2M-item one (counts, the flagged list capped with a count,
sampled sheets; see report/collect.py for what each part costs).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from avprep import quality
from pipeline.changes import read_saved
from report import collect, plots
from speechfeat.wer import word_errors

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
FLAGGED_TSV = "flagged.tsv"
SAMPLE_SHEET = "crop_sample.jpg"
LAUNCHES = "launches.jsonl"
CROP_CACHE = "crop_scan.json"
TEMPLATE = Path(__file__).with_name("template.html")

FLAGGED_SHOWN = 40  # flagged items shown with their tiles (all of them are in flagged.tsv)
SAMPLE_ITEMS = 24  # items on the corpus sample sheet (one per shard, shards spread evenly)
FAILED_SHOWN = 50  # failed shards listed per page
HYPOTHESES_SHOWN = 5  # per split
REASONS_SHOWN = 15


@dataclass
class Report:
    path: Path
    state: str  # complete | failed | running | incomplete | empty
    outputs: List[tuple] = field(default_factory=list)  # (what, path) of the main outputs that exist
    problems: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ helpers
def h(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_pct(v, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def fmt_duration(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    hr, m = divmod(m, 60)
    if hr < 48:
        return f"{hr} h {m:02d} min"
    d, hr = divmod(hr, 24)
    return f"{d} d {hr:02d} h"


def fmt_time(t) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def table(headers: List[str], rows: List[List[str]], numeric: tuple = (), row_class=None) -> str:
    """An HTML table; cells are already HTML. ``numeric``: indexes of right-aligned columns."""
    head = "".join(f'<th class="n">{h(c)}</th>' if i in numeric else f"<th>{h(c)}</th>" for i, c in enumerate(headers))
    body = []
    for k, r in enumerate(rows):
        cls = row_class(k) if row_class else ""
        cells = "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img(data: Optional[bytes], alt: str, mime: str = "image/png", cls: str = "plot") -> str:
    if not data:
        return ""
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="{cls}" alt="{h(alt)}" src="data:{mime};base64,{b64}">'


def jpeg(image) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return buf.tobytes() if ok else b""


def section(anchor: str, title: str, content: str, cls: str = "") -> str:
    return f'<section id="{anchor}" class="{cls}"><h2>{h(title)}</h2>{content}</section>'


def rel_link(path: Path, report_dir: Path, text: Optional[str] = None) -> str:
    """A link relative to the report (works wherever the work dir is mounted)."""
    rel = os.path.relpath(path, report_dir)
    return f'<a href="{h(rel)}" class="path">{h(text or path)}</a>'


def scope_label(it: Optional[int]) -> str:
    return "–" if it is None else str(it)


# ------------------------------------------------------------------------------------------ build
def build_report(workdir: Path, launch: Optional[dict] = None) -> Report:
    """Write ``WORKDIR/report/index.html`` (and flagged.tsv, crop_sample.jpg); returns where, the
    run's state and its main outputs."""
    from pipeline import atomic

    workdir = Path(workdir).resolve()
    out_dir = workdir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _load_config(workdir)
    bounds = collect.quality_bounds(cfg)
    order = _stage_order()

    steps = collect.collect_steps(workdir, order)
    crop_scan = collect.scan_crop(workdir / "crop", out_dir / CROP_CACHE, bounds)
    launches = _read_launches(out_dir / LAUNCHES)
    if launch is None and launches:
        launch = launches[-1]

    state = _overall_state(steps, launch)
    n_iter = int((cfg or {}).get("iterations") or 0)
    iterations = collect.iterations_present(workdir, n_iter)
    units = collect.units_dirs(workdir, cfg)
    outputs = main_outputs(workdir, iterations, units)
    problems: List[str] = []
    parts: List[tuple] = []  # (anchor, nav title, html)

    if launch and launch.get("rc") not in (None, 0):
        first = (launch.get("error") or f"exit status {launch.get('rc')}").strip().splitlines()[0]
        problems.append(f'the last launch failed: <code>{h(first)}</code> (<a href="#launch">details</a>)')
    parts.append(("overview", "Overview", _overview(workdir, steps, crop_scan, iterations, cfg, outputs, problems)))
    # each section from its own files: one missing or malformed costs a line in its section, never
    # the page (nor a traceback on the launcher's terminal)
    for s in steps:
        if s.changed:
            problems.append(f"{h(_step_name(s))} was made with other settings than the last launch's "
                            f"(<code>{h(s.changed)}</code>): <code>--redo-changed</code> redoes it and what reads it "
                            '(<a href="#stages">stages</a>)')
    sections = [("stages", "Stages", _stages_section, (steps, workdir, out_dir), ".pipeline/state/"),
                ("crop", "Crop", _crop_section, (workdir, out_dir, crop_scan, bounds, problems), "crop/"),
                ("manifest", "Manifest", _manifest_section, (workdir,), "manifest/"),
                ("noise", "Noise", _noise_section, (workdir, out_dir, steps, problems), "noise/summary.json"),
                ("iterations", "Iterations", _iterations_section, (workdir, iterations, steps), "iter*/"),
                ("finetune", "Fine-tuning", _finetune_section, (workdir, out_dir), "finetune/results.json"),
                ("units", "Units", _units_section, (workdir, out_dir, units, steps, problems),
                 ", ".join(str(d) for d in units) or "units/"),
                ("disk", "Disk", _disk_section, (workdir, crop_scan), str(workdir)),
                ("failures", "Failures & logs", _failures_section, (steps, crop_scan), ".pipeline/"),
                ("launch", "Launch & config", _launch_section, (workdir, launch, launches), "report/launches.jsonl")]
    for anchor, title, make, args, source in sections:
        parts.append((anchor, title, _guarded(source, make, *args, problems=problems, anchor=anchor)))

    problems_html = ""
    if problems:
        problems_html = section("problems", "Needs attention",
                                "<ul>" + "".join(f"<li>{p}</li>" for p in problems) + "</ul>", "problems")
    body = problems_html + "".join(section(a, t, c) for a, t, c in parts if c)
    nav = "".join(f'<a href="#{a}">{h(t)}</a>' for a, t, c in parts if c)
    title = "AV-HuBERT pipeline report"
    subtitle = (f"{h(workdir)}"
                + (f" · corpus {h(cfg.get('corpus'))} ({h(cfg.get('layout'))})" if cfg else "")
                + (f" · preset {h(cfg.get('preset'))}, cluster {h((cfg.get('cluster') or {}).get('name'))}" if cfg else ""))
    page = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=h(title), state_badge=f'<span class="badge {state}">{h(state)}</span>', subtitle=subtitle,
        nav=nav, body=body,
        footer=f"written {h(fmt_time(time.time()))} by <code>launch.py report</code> · "
               f"rerun <code>python launch.py report --workdir {h(workdir)}</code> to refresh")
    path = out_dir / INDEX
    atomic.write_text(path, page)
    return Report(path, state, [(w, p) for w, p in outputs if Path(p).exists()], problems)


def _guarded(source: str, make, *args, problems: Optional[List[str]] = None, anchor: str = "") -> str:
    """A section's HTML; a section whose files (``source``, as the user finds them) cannot be read
    or make no sense is one line saying so (the rest of the page stands), also listed in
    ``problems`` when given."""
    try:
        return make(*args)
    except Exception as e:  # noqa: BLE001 - a view of whatever is on disk; never the launch's failure
        log.debug("report section from %s failed", source, exc_info=True)
        where = h(getattr(e, "filename", None) or source)
        if problems is not None:
            problems.append(f'the report could not read <span class="path">{where}</span> '
                            f'(<a href="#{h(anchor)}">{h(type(e).__name__)}</a>)')
        return (f'<p class="note bad">This section could not be built from its files (<span class="path">{where}'
                f"</span>): "
                f"<code>{h(type(e).__name__)}: {h(str(e)[:300])}</code>. The other sections are not affected; "
                f"rerun <code>launch.py report</code> once the files are complete.</p>")


def _stage_order() -> List[str]:
    try:
        from stages import STAGE_ORDER

        return list(STAGE_ORDER)
    except Exception:  # the report of a work dir never depends on every stage importing
        return ["crop", "manifest", "features", "kmeans", "labels", "train", "finetune"]


def _load_config(workdir: Path) -> Optional[dict]:
    p = workdir / ".pipeline" / "config.yaml"
    if not p.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:
        log.warning("report: cannot read %s: %s", p, e)
        return None


def _read_launches(path: Path) -> List[dict]:
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


def _overall_state(steps, launch) -> str:
    if not steps:
        return "empty"
    if any(s.state == "failed" for s in steps) or (launch and launch.get("rc") not in (None, 0)):
        return "failed"
    if any(s.state == "running" for s in steps):
        return "running"
    if all(s.state == "complete" for s in steps):
        return "complete"
    return "incomplete"


def main_outputs(workdir: Path, iterations: List[int], units_dirs: List[Path] = ()) -> List[tuple]:
    """(what, path) of the main outputs: the last pretrained checkpoint, every k-means model, the
    fine-tuned checkpoint and its results, the units of a finished units run."""
    out = []
    finals = [workdir / f"iter{i}" / "train" / "checkpoints" / "checkpoint_final.pt" for i in iterations]
    done = [p for p in finals if p.exists()]
    if done:
        out.append(("final pretrained checkpoint", done[-1]))
    for i in iterations:
        km = workdir / f"iter{i}" / "kmeans" / "kmeans.joblib"
        if km.exists():
            out.append((f"k-means model, iteration {i}", km))
    out.append(("fine-tuned checkpoint", workdir / "finetune" / "checkpoints" / "checkpoint_final.pt"))
    out.append(("fine-tuning results", workdir / "finetune" / "results.json"))
    for d in units_dirs:
        if (d / "summary.json").is_file():
            out.append(("units", d))
    return out


# ------------------------------------------------------------------------------------------ sections
def _overview(workdir, steps, crop_scan, iterations, cfg, outputs, problems) -> str:
    cards = []

    def card(k, v, d="", cls=""):
        cards.append(f'<div class="card {cls}"><div class="k">{h(k)}</div><div class="v">{v}</div>'
                     f'<div class="d">{d}</div></div>')

    failed_steps = [s for s in steps if s.failed]
    n_failed_shards = sum(len(s.failed) for s in steps)
    if crop_scan:
        rate = crop_scan.failed / crop_scan.items if crop_scan.items else 0
        card("items cropped", f"{crop_scan.ok:,}", f"of {crop_scan.items:,} · {crop_scan.failed:,} failed ({rate:.1%})",
             "bad" if rate > 0.05 else "")
        share = crop_scan.n_flagged / max(crop_scan.with_quality, 1)
        card("flagged crops", f"{crop_scan.n_flagged:,}", f"{share:.1%} of {crop_scan.with_quality:,} with quality figures",
             "warn" if crop_scan.n_flagged else "")
        if crop_scan.failed:
            problems.append(f"{crop_scan.failed:,} of {crop_scan.items:,} items failed to crop: "
                            f'<a href="#crop-failures">reasons</a>')
        if crop_scan.n_flagged:
            problems.append(f"{crop_scan.n_flagged:,} cropped items are flagged by the quality bounds: "
                            f'<a href="#flagged">see them</a> (they stay in the manifest)')
    else:
        card("items cropped", "–", "crop has not written results yet")
    summary = collect.read_json(workdir / "manifest" / "summary.json")
    if summary:
        counts = summary.get("counts", {})
        card("manifest", f"{sum(counts.values()):,}", " · ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    n_cfg = int((cfg or {}).get("iterations") or 0)
    done_iters = [i for i in iterations
                  if (workdir / f"iter{i}" / "train" / "checkpoints" / "checkpoint_final.pt").exists()]
    card("iterations trained", f"{len(done_iters)}",
         f"of {n_cfg or len(iterations)} configured" if (n_cfg or iterations) else "no configuration recorded")
    results = collect.read_json(workdir / "finetune" / "results.json")
    if results:
        wers = {k: v.get("wer") for k, v in (results.get("splits") or {}).items()}
        main = wers.get("test", wers.get("valid"))
        card("WER", "–" if main is None else f"{main:.1f}%", " · ".join(
            f"{k} {v:.1f}%" for k, v in wers.items() if v is not None))
    if failed_steps:
        card("failed shards", f"{n_failed_shards:,}", ", ".join(sorted({_step_name(s) for s in failed_steps}))[:120], "bad")
        for s in failed_steps:
            problems.append(f"{h(_step_name(s))}: {len(s.failed)} shard(s) failed, e.g. "
                            f"<code>{h(s.failed[0][2])}</code> (log <span class=\"path\">{h(s.failed[0][1])}</span>)")
    for s in steps:
        if s.state == "incomplete":
            problems.append(f"{h(_step_name(s))} is incomplete: {s.done:,}/{fmt_num(s.total)} shards done"
                            + ("" if s.done != s.total else ", not finalized"))
    try:
        usage = shutil.disk_usage(workdir)
        free = usage.free / usage.total if usage.total else 1
        card("free disk", fmt_bytes(usage.free), f"{free:.0%} of the work dir's filesystem", "warn" if free < 0.1 else "")
    except OSError:
        pass
    rows = []
    for what, p in outputs:
        exists = Path(p).exists()
        rows.append([h(what), f'<span class="path">{h(p)}</span>',
                     '<span class="badge complete">present</span>' if exists else '<span class="badge incomplete">not yet</span>'])
    return (f'<div class="cards">{"".join(cards)}</div><h3>Main outputs</h3>'
            + table(["output", "path", ""], rows))


def _step_name(s) -> str:
    return s.stage if s.iteration is None else f"{s.stage} (iteration {s.iteration})"


def _settings_cell(s, workdir: Path, report_dir: Path) -> str:
    """The step's settings digest, linked to its provenance.json; marked when the last launch's
    settings differ from those its outputs were made with."""
    cell = "–"
    if s.settings_digest:
        cell = (rel_link(workdir / s.provenance, report_dir, s.settings_digest) if s.provenance
                else f'<span class="path">{h(s.settings_digest)}</span>')
    if s.changed:
        cell += f' <span class="badge failed" title="{h(s.changed)}">changed</span> {h(s.changed)}'
    return cell


def _stages_section(steps, workdir: Path, report_dir: Path) -> str:
    if not steps:
        return '<p class="note">Nothing recorded yet: no launch has run a stage in this work dir.</p>'
    rows = []
    for s in steps:
        job = fmt_duration(s.job_seconds) + (" (est.)" if s.job_seconds_estimated else "")
        span = fmt_duration(s.last_end - s.first_start) if s.first_start and s.last_end else "–"
        rows.append([h(scope_label(s.iteration)), h(s.stage), f"{s.done:,}/{fmt_num(s.total)}", fmt_num(s.running),
                     fmt_num(len(s.failed)), f'<span class="badge {s.state}">{s.state}</span>', job, span,
                     fmt_duration(s.step_seconds), h(fmt_time(s.finished_at)), _settings_cell(s, workdir, report_dir)])
    note = ('<p class="note">Job time: the shards\' own run times added up (compute used). Span: first shard '
            'start to last shard end (wall clock, across launches). Last step: the wall time of the launch step '
            'that finalized the stage. Settings: a digest of the settings the step\'s outputs were made with, '
            'linked to its provenance.json (settings, inputs, command, versions, host, times); <em>changed</em>: '
            'the last launch\'s settings differ (<code>launch.py --dry-run</code> shows what a redo takes, '
            '<code>--redo-changed</code> redoes it).</p>')
    notes = [line for line in read_saved(workdir).get("lines") or [] if line.startswith("note:")]
    note += "".join(f'<p class="note">{h(line)}</p>' for line in notes)
    named = [(_step_name(s), s.job_seconds) for s in steps if s.job_seconds]
    chart = plots.step_times([n for n, _ in named], [v for _, v in named]) if len(named) >= 3 else None
    return (table(["iteration", "stage", "shards done", "running", "failed", "state", "job time", "span",
                   "last step", "finished", "settings"], rows, numeric=(2, 3, 4, 6, 7, 8),
                  row_class=lambda k: "failed" if steps[k].failed else "")
            + note + img(chart, "job time per step"))


def _crop_section(workdir: Path, out_dir: Path, scan, bounds: quality.QualityBounds, problems: List[str]) -> str:
    from pipeline import atomic

    parts = [_guarded("crop/items/index.json, listing.json", _listing_html, workdir, out_dir, problems)]
    if scan is None:
        return "".join(parts) + '<p class="note">The crop stage has not written results yet.</p>'
    rate = scan.failed / scan.items if scan.items else 0
    hours = scan.frames / 25 / 3600
    parts.append("<h3>Crop results</h3>")
    parts.append(table(["shards with results", "items", "ok", "failed", "failure rate", "frames", "hours", "rotated sources"],
                       [[fmt_num(scan.shards), fmt_num(scan.items), fmt_num(scan.ok), fmt_num(scan.failed),
                         fmt_pct(rate), fmt_num(scan.frames), f"{hours:.2f}", fmt_num(scan.rotated)]],
                       numeric=tuple(range(8))))
    if scan.splits:
        parts.append('<p class="note">ok items per split: ' + ", ".join(
            f"{h(k)} {v:,}" for k, v in sorted(scan.splits.items())) + "</p>")
    if scan.rotated:
        angles = ", ".join(f"{h(a)}° {n:,}" for a, n in sorted(scan.rotations.items(), key=lambda x: int(x[0])))
        examples = ", ".join(f"{h(i)} ({a}°)" for i, a in scan.rotated_examples[:5])
        parts.append(f'<p class="note">Sources stored turned (phones: display matrix), turned upright before the '
                     f"landmarks: {angles} (e.g. {examples}). Their tiles below and on the contact sheets show "
                     f"the upright crops.</p>")
    elif scan.with_quality:
        parts.append('<p class="note">No source needed turning upright (the rotation the crop applied is recorded '
                     "per item).</p>")
    if scan.failed:
        rows = [[fmt_num(n), h(g), h(scan.reason_examples.get(g, ["", ""])[0]),
                 f'<span class="path">{h(scan.reason_examples.get(g, ["", ""])[1])}</span>']
                for g, n in scan.reasons.most_common(REASONS_SHOWN)]
        more = len(scan.reasons) - REASONS_SHOWN
        parts.append('<h3 id="crop-failures">Failure reasons</h3>' + table(["items", "reason", "example id", "example"], rows, numeric=(0,))
                     + (f'<p class="note">and {more:,} other reason(s); every failure is in '
                        f'<span class="path">{h(workdir / "crop" / "results")}/*.jsonl</span></p>' if more > 0 else ""))

    # quality
    parts.append("<h3>Quality</h3>")
    if not scan.with_quality:
        parts.append('<p class="note">' + ("No item has been cropped." if not scan.ok else
                     "No item has quality figures (cropped before they were recorded).") + "</p>")
        return "".join(parts)
    rows = []
    for code, (figure, attr, kind, meaning) in quality.FLAGS.items():
        op = {"min": "&lt;", "max": "&gt;", "absmax": "|x| &gt;"}[kind]
        n = scan.flag_counts.get(code, 0)
        rows.append([f"<code>{h(code)}</code>", h(meaning), f"{h(figure)} {op} <code>crop.quality.{h(attr)}="
                     f"{h(fmt_num(getattr(bounds, attr)))}</code>", fmt_num(n), fmt_pct(n / scan.with_quality)])
    parts.append(table(["flag", "meaning", "bound", "items", "share"], rows, numeric=(3, 4),
                       row_class=lambda k: "failed" if scan.flag_counts.get(list(quality.FLAGS)[k]) else ""))
    if not bounds.enabled:
        parts.append('<p class="note">Flags are off (<code>crop.quality.enabled=false</code>).</p>')
    parts.append('<p class="note">A flag is not a failure: flagged items stay in the manifest. Change a bound '
                 '(e.g. <code>crop.quality.min_face_px=30</code>) and rerun <code>launch.py report</code> to see '
                 'its effect; contact sheets keep the outlines of the bounds in force when the items were cropped.</p>')
    parts.append(img(plots.quality_histograms(scan.hist, bounds), "quality histograms"))

    # flagged items with their tiles, and every flagged item in flagged.tsv
    flagged = sorted(scan.flagged, key=lambda f: (f["shard"], f.get("sheet_index") or 0))
    tsv_lines = ["id\tshard\tsplit\tflags\t" + "\t".join(collect.FLAGGED_FIGURES)]
    for f in flagged:
        tsv_lines.append("\t".join([f["id"], f["shard"], f.get("split", ""), ",".join(f["flags"])]
                                   + [str(f["q"].get(k, "")) for k in collect.FLAGGED_FIGURES]))
    atomic.write_text(out_dir / FLAGGED_TSV, "\n".join(tsv_lines) + "\n")
    parts.append(f'<h3 id="flagged">Flagged items ({len(flagged):,})</h3>')
    if flagged:
        # spread the shown ones over the kinds of flag: the first items of each code, then the rest
        shown = _pick_flagged(flagged, FLAGGED_SHOWN)
        sheets = _SheetCache(workdir / "crop" / "sheets", bounds.sheet_frames)
        cells = []
        for f in shown:
            tile = sheets.cell(f["shard"], f.get("sheet_index"))
            desc = "".join(f"<li>{h(quality.describe_flag(c, f['q'], bounds))}</li>" for c in f["flags"])
            tile_html = img(jpeg(tile), f"tiles of {f['id']}", "image/jpeg", "tile") if tile is not None else \
                '<p class="note">(no contact sheet for this shard)</p>'
            sheet_path = workdir / "crop" / "sheets" / f"{f['shard']}.png"
            cells.append(f'<div class="flag-item"><div class="id">{h(f["id"])}</div>{tile_html}<ul>{desc}</ul>'
                         f'<div class="note">shard {rel_link(sheet_path, out_dir, f["shard"])} · {h(f.get("split", ""))}</div></div>')
        parts.append(f'<div class="flagged">{"".join(cells)}</div>')
        if len(flagged) > len(shown):
            parts.append(f'<p class="note">{len(shown)} of {len(flagged):,} flagged items shown.</p>')
        parts.append(f'<p class="note">Every flagged item with its figures: {rel_link(out_dir / FLAGGED_TSV, out_dir, FLAGGED_TSV)}</p>')
    else:
        parts.append('<p class="note">No item is outside the bounds.</p>')

    # corpus-level sample sheet
    sample = _sample_sheet(workdir, out_dir, scan, bounds)
    if sample is not None:
        parts.append(f"<h3>Sample of the corpus ({sample[1]} items across {scan.shards:,} shard(s))</h3>"
                     + img(sample[0], "corpus sample sheet", "image/jpeg"))
    sheets_dir = workdir / "crop" / "sheets"
    if sheets_dir.is_dir():
        parts.append(f'<p class="note">Contact sheet of every shard (a few ROI frames per item, flagged items '
                     f'framed in red): {rel_link(sheets_dir, out_dir, str(sheets_dir) + "/")}</p>')
    return "".join(parts)


def _listing_html(workdir: Path, out_dir: Path, problems: List[str]) -> str:
    """The frozen item list and what the last listing of the corpus found (crop/items/)."""
    info = collect.read_listing(workdir / "crop" / "items")
    if info is None:
        return ""
    idir = info["dir"]
    parts = ["<h3>Corpus listing</h3>"]
    if "frozen" in info:
        parts.append(f'<p class="note">Frozen item list {rel_link(idir, out_dir, "crop/items/")}: '
                     f'{info["frozen"]:,} items in {info["shards"]:,} shards ({info["batches"]:,} batch(es)), '
                     f'listed from <span class="path">{h(info.get("corpus"))}</span> ({h(info.get("layout"))}).</p>')
    listing = info.get("listing")
    if listing is None:
        return "".join(parts) + '<p class="note">No listing report (crop/items/listing.json) yet.</p>'
    removed, changed = int(listing.get("removed") or 0), int(listing.get("changed") or 0)
    parts.append(table(["listed", "frozen before", "new", "planned again", "gone from the corpus", "changed"],
                       [[fmt_num(listing.get(k)) for k in ("listed", "frozen_before", "new", "replanned")]
                        + [fmt_num(removed), fmt_num(changed)]], numeric=tuple(range(6))))
    notes = []
    if removed:
        ex = ", ".join(h(i) for i in listing.get("removed_examples") or [])
        notes.append(f"gone: {removed:,} frozen item(s) whose source is no longer listed" + (f" (e.g. {ex})" if ex else "")
                     + f"; all in {rel_link(idir / 'removed.txt', out_dir, 'removed.txt')}")
    if changed:
        ex = "; ".join(f"{h(i)}: {h(w)}" for i, w in listing.get("changed_examples") or [])
        notes.append(f"changed: {changed:,} frozen item(s) whose source differs now" + (f" (e.g. {ex})" if ex else "")
                     + f"; all in {rel_link(idir / 'changed.txt', out_dir, 'changed.txt')}")
    if removed or changed:
        notes.append("their crops are from the files as first listed; <code>manifest.drop_removed=true</code> "
                     "leaves them out of the manifest")
        problems.append(f"the last corpus listing found {removed:,} gone and {changed:,} changed source(s): "
                        f'<a href="#crop">see the listing</a>')
    parts += [f'<p class="note">{n}</p>' for n in notes]
    kinds = listing.get("problems") or {}
    if kinds:
        rows = [[h(kind), fmt_num(int(p.get("count") or 0)), "<br>".join(h(m) for m in p.get("examples") or [])]
                for kind, p in sorted(kinds.items())]
        parts.append("<h3>Listing problems</h3>" + table(["problem", "items", "first ones"], rows, numeric=(1,))
                     + '<p class="note">Each such item is a failure record of the crop stage (never cropped, never '
                       "guessed); fix the files and relaunch: the items are planned again.</p>")
        total = sum(int(p.get("count") or 0) for p in kinds.values())
        problems.append(f"{total:,} item(s) of the corpus cannot be used as listed ("
                        + ", ".join(h(k) for k in sorted(kinds)) + '): <a href="#crop">listing problems</a>')
    return "".join(parts)


def _pick_flagged(flagged: List[dict], n: int) -> List[dict]:
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


class _SheetCache:
    """Decoded shard sheets, a few at a time (each is read for the cells cut from it)."""

    def __init__(self, sheets_dir: Path, n_tiles: int):
        self.dir, self.n_tiles, self.cache = sheets_dir, n_tiles, {}

    def cell(self, shard: str, index):
        import cv2

        if index is None:
            return None
        if shard not in self.cache:
            if len(self.cache) >= 4:  # a decoded sheet of 50 items is ~10 MB
                self.cache.clear()
            p = self.dir / f"{shard}.png"
            self.cache[shard] = cv2.imread(str(p), cv2.IMREAD_COLOR) if p.is_file() else None
        sheet = self.cache[shard]
        if sheet is None:
            return None
        cell = quality.sheet_tiles(sheet, int(index), self.n_tiles)
        return cell if cell.size else None


def _sample_sheet(workdir: Path, out_dir: Path, scan, bounds) -> Optional[tuple]:
    from pipeline import atomic

    samples = sorted(scan.samples, key=lambda s: (s["shard"], s["sheet_index"]))
    if not samples:
        return None
    n = min(SAMPLE_ITEMS, len(samples))
    picked = [samples[i * len(samples) // n] for i in range(n)]  # spread over the shards
    sheets = _SheetCache(workdir / "crop" / "sheets", bounds.sheet_frames)
    cells = [c for c in (sheets.cell(s["shard"], s["sheet_index"]) for s in picked) if c is not None]
    if not cells:
        return None
    size = cells[0].shape[:2]
    cells = [c for c in cells if c.shape[:2] == size]
    data = jpeg(quality.compose_cells(cells, columns=3))
    with atomic.atomic_open(out_dir / SAMPLE_SHEET, "wb") as f:
        f.write(data)
    return data, len(cells)


def _manifest_section(workdir: Path) -> str:
    mdir = workdir / "manifest"
    summary = collect.read_json(mdir / "summary.json")
    if summary is None and not mdir.is_dir():
        return '<p class="note">The manifest stage has not run yet.</p>'
    rows = []
    splits = ("train", "valid", "test")
    counts = (summary or {}).get("counts") or {}
    frames = (summary or {}).get("frames") or {}
    for split in splits:
        n = counts.get(split)
        if n is None:
            lines = collect.count_lines(mdir / f"{split}.tsv")
            n = None if lines is None else max(lines - 1, 0)  # the first line is the root
        fr = frames.get(split)
        rows.append([h(split), fmt_num(n), fmt_num(fr), "–" if fr is None else f"{fr / 25 / 3600:.2f}",
                     "yes" if (mdir / f"{split}.wrd").exists() else "no"])
    failures = collect.count_lines(mdir / "failures.jsonl")
    extra = []
    if summary:
        for k in ("failures", "not_cropped", "not_in_corpus", "spm_model", "spm_vocab_size"):
            if k in summary:
                extra.append(f"{h(k)}: <code>{h(summary[k])}</code>")
    if failures:
        extra.append(f"failure records: {rel_link(mdir / 'failures.jsonl', workdir / REPORT_DIR, 'failures.jsonl')} "
                     f"({failures:,} lines)")
    return (table(["split", "utterances", "video frames", "hours", "transcripts"], rows, numeric=(1, 2, 3))
            + (f'<p class="note">{" · ".join(extra)}</p>' if extra else ""))


NOISE_SPLITS = ("train", "valid", "test")


def _noise_section(workdir: Path, out_dir: Path, steps, problems: List[str]) -> str:
    """The noise stage's clips per category and split (noise/summary.json), its failures and notes."""
    ndir = workdir / "noise"
    step = next((st for st in steps if st.stage == "noise"), None)
    if not ndir.is_dir() and step is None:
        return ""  # this run uses no noise of its own
    path = ndir / "summary.json"
    if not path.is_file():
        state = f" ({step.done:,}/{fmt_num(step.total)} shards done)" if step else ""
        return f'<p class="note">The noise stage has not finished{state}: no noise/summary.json yet.</p>'
    summary = json.loads(path.read_text())
    categories = summary["categories"]
    rows, totals = [], {sp: [0, 0.0] for sp in NOISE_SPLITS}
    for category, per in sorted(categories.items()):
        cells = []
        for sp in NOISE_SPLITS:
            c = per.get(sp) or {}
            clips, sec = int(c.get("clips") or 0), float(c.get("seconds") or 0.0)
            totals[sp][0] += clips
            totals[sp][1] += sec
            cells.append(f"{clips:,} ({fmt_duration(sec)})" if clips else "–")
        lists = " ".join(rel_link(ndir / category / f"{sp}.tsv", out_dir, sp) for sp in NOISE_SPLITS
                         if (ndir / category / f"{sp}.tsv").is_file())
        rows.append([h(category)] + cells + [lists])
    rows.append(["<b>all</b>"] + [f"<b>{n:,}</b> ({fmt_duration(sec)})" for n, sec in totals.values()]
                + [" ".join(rel_link(ndir / f"{sp}.tsv", out_dir, sp) for sp in NOISE_SPLITS
                            if (ndir / f"{sp}.tsv").is_file())])
    out = [table(["category", "train clips", "valid clips", "test clips", "lists"], rows, numeric=(1, 2, 3)),
           '<p class="note">Clips per noise category and split (their total audio in brackets), as the noise stage '
           "wrote them; training and fine-tuning mix the train clips, evaluation the valid/test ones.</p>"]
    failures = int(summary.get("failures") or 0)
    extra = [f"noise dir {rel_link(ndir, out_dir, str(ndir) + '/')}"]
    if summary.get("skipped"):
        extra.append(f"{int(summary['skipped']):,} silent piece(s) skipped")
    if failures:
        extra.append(f"{failures:,} noise file(s) could not be read: "
                     f"{rel_link(ndir / 'failures.jsonl', out_dir, 'failures.jsonl')}")
        problems.append(f'{failures:,} noise file(s) could not be read: <a href="#noise">noise</a>')
    out.append(f'<p class="note">{" · ".join(extra)}</p>')
    notes = summary.get("notes") or []
    if notes:
        out.append("<ul>" + "".join(f'<li class="note">{h(n)}</li>' for n in notes) + "</ul>")
    return "".join(out)


def _noise_wer_html(noise: dict, out_dir: Path, eval_dir: Path) -> str:
    """WER per split, modality, noise category and SNR (results.json["noise"]) as tables and a plot."""
    snrs = [f"{float(x):g}" for x in noise.get("snrs") or []]
    table_ = noise["wer"]
    parts = ["<h3>WER under noise</h3>"]
    for split, per_modality in table_.items():
        rows = []
        for modality, cells in per_modality.items():
            clean = cells.get("clean")
            cats = [c for c in cells if c != "clean"]
            rows.append([h(_modalities(modality)), "<b>clean</b>", _wer(clean)] + [""] * len(snrs))
            for category in cats:
                by_snr = cells[category] or {}
                rows.append(["", h(category), ""] + [_wer(by_snr.get(k)) for k in snrs])
        parts.append(f"<p><b>{h(split)}</b></p>" + table(["input", "noise", "clean"] + [f"{k} dB" for k in snrs], rows,
                                                         numeric=tuple(range(2, 3 + len(snrs)))))
    parts.append(img(plots.noise_wer(table_, snrs), "WER under noise"))
    meta = [f"noise from <span class=\"path\">{h(noise.get('dir'))}</span>", f"seed {h(noise.get('seed'))}",
            f"each condition's hypotheses: {rel_link(eval_dir, out_dir, 'finetune/noise_eval/')}"]
    parts.append(f'<p class="note">{" · ".join(meta)}. Noise is mixed into the audio stream only; '
                 "a video-only input is decoded clean.</p>")
    notes = noise.get("notes") or []
    if notes:
        parts.append("<ul>" + "".join(f'<li class="note">{h(n)}</li>' for n in notes) + "</ul>")
    return "".join(parts)


def _wer(v) -> str:
    return "–" if v is None else f"{float(v):.1f}%"


def _units_section(workdir: Path, out_dir: Path, dirs: List[Path], steps, problems: List[str]) -> str:
    """Each units run (units.out_dir): what it was computed from, K, layer, per split the rows done
    and failed, cluster use, and links to its files."""
    ustep = next((st for st in steps if st.stage == "units"), None)
    kstep = next((st for st in steps if st.stage == "units_kmeans"), None)
    if not dirs:
        if ustep is None:
            return ""  # no units run here
        return (f'<p class="note">The units stage has started ({ustep.done:,}/{fmt_num(ustep.total)} shards) but its '
                "output directory is not found (units.out_dir of the last launch).</p>")
    out = []
    for d in dirs:
        settings = collect.read_json(d / "settings.json") if (d / "settings.json").is_file() else None
        if (d / "settings.json").is_file() and settings is None:
            raise ValueError(f"{d / 'settings.json'}: not readable JSON")
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        settings = (summary or {}).get("settings") or settings or {}
        out.append(f"<h3>Units in {rel_link(d, out_dir, str(d) + '/')}</h3>")
        kmeans = settings.get("kmeans")
        source = {"trained": "trained here (units_kmeans)", "iteration": "an iteration's own k-means",
                  "file": "a given model"}.get(kmeans, kmeans)
        model = settings.get("kmeans_model") or (str(d / "kmeans.joblib") if kmeans == "trained" else None)
        rows = [["checkpoint", f'<span class="path">{h(settings.get("checkpoint"))}</span>'],
                ["layer", h((summary or {}).get("layer", settings.get("layer")))],
                ["input", h(_modalities(settings.get("modality")))],
                ["K (clusters)", fmt_num((summary or {}).get("n_clusters"))],
                ["k-means", h(source) + (f' · <span class="path">{h(model)}</span>' if model else "")]]
        if kmeans == "trained" and kstep is not None:
            stats = _done_stats(workdir, "units_kmeans")
            if stats:
                rows.append(["k-means training", f"{fmt_num(stats.get('utterances'))} utterances, "
                                                 f"{fmt_num(stats.get('frames'))} frames, inertia {fmt_num(stats.get('inertia'))}"])
        out.append(table(["", ""], rows))
        if summary is None:
            state = f"{ustep.done:,}/{fmt_num(ustep.total)} shards done" if ustep else "not run"
            out.append(f'<p class="note">Not finished ({state}): the per-split files are written when every shard '
                       "is done.</p>")
            continue
        split_rows, failures = [], []
        for split, st in (summary.get("splits") or {}).items():
            n, failed = int(st.get("utterances") or 0), int(st.get("failed_utterances") or 0)
            files = " ".join(rel_link(d / f"{split}.{ext}", out_dir, f".{ext}") for ext in ("units", "rle", "jsonl")
                             if (d / f"{split}.{ext}").is_file())
            split_rows.append([h(split), fmt_num(n - failed), fmt_num(failed), fmt_num(st.get("frames")),
                               f'{fmt_num(st.get("clusters_used"))}/{fmt_num(st.get("n_clusters"))}',
                               f'{fmt_num(st.get("entropy_bits"))} / {fmt_num(st.get("max_entropy_bits"))}', files])
            failures += [(split, f) for f in st.get("failures") or []]
        out.append(table(["split", "utterances done", "failed", "frames (25 Hz)", "clusters used",
                          "entropy (bits) / max", "files"], split_rows, numeric=(1, 2, 3, 4, 5),
                         row_class=lambda k: "failed" if split_rows[k][2] not in ("0", "–") else ""))
        links = [rel_link(d / f, out_dir, f) for f in ("dict.units.txt", "summary.json", "settings.json") if (d / f).is_file()]
        out.append(f'<p class="note">{" · ".join(links)} · formats: <code>.units</code> one line of unit ids per '
                   "manifest row, <code>.rle</code> runs and durations, <code>.jsonl</code> speech-resynthesis manifest "
                   f'(key <code>{h(settings.get("jsonl_key", "hubert"))}</code>; failed rows left out)</p>')
        if failures:
            n_failed = sum(int(st.get("failed_utterances") or 0) for st in summary["splits"].values())
            out.append(table(["split", "id", "reason"], [[h(sp), h(f.get("id")), f'<span class="path">{h(f.get("reason"))}</span>']
                                                       for sp, f in failures[:10]]))
            problems.append(f'{n_failed:,} utterance(s) have no units (empty lines): <a href="#units">units</a>')
    return "".join(out)


def _done_stats(workdir: Path, stage: str) -> Optional[dict]:
    """The stats of a once-only, one-shard step's done marker (units_kmeans)."""
    from pipeline.state import StateStore

    store = StateStore(workdir)
    keys = sorted(store.markers(stage, None)["done"])
    m = store.read_done(stage, None, keys[0]) if keys else None
    return (m or {}).get("stats") or None


def _iterations_section(workdir: Path, iterations: List[int], steps) -> str:
    started = [it for it in iterations if (workdir / f"iter{it}").is_dir()]
    if not started:
        return (f'<p class="note">No pretraining iteration has started yet'
                f'{f" ({len(iterations)} configured)" if iterations else ""}.</p>')
    rows, metric_rows, losses, usage_imgs = [], [], {}, []
    train_steps = {s.iteration: s for s in steps if s.stage == "train"}
    for it in iterations:
        rep = collect.read_json(workdir / f"iter{it}" / "labels" / "report.json")
        if rep:
            target = f"layer {rep['layer']}" if rep.get("layer") is not None else str(rep.get("features", "?"))
            for split, st in (rep.get("splits") or {}).items():
                cp = st.get("char_purity") or {}
                metric_rows.append({"iteration": it, "split": split, "clusters_used": st.get("clusters_used", 0),
                                    "n_clusters": st.get("n_clusters", rep.get("n_clusters", 0)),
                                    "entropy_bits": st.get("entropy_bits", 0.0),
                                    "max_entropy_bits": st.get("max_entropy_bits", 1.0),
                                    "cluster_purity": cp.get("cluster_purity"),
                                    "mutual_information_bits": cp.get("mutual_information_bits")})
                rows.append([str(it), h(target), fmt_num(rep.get("n_clusters")), h(split),
                             f'{fmt_num(st.get("clusters_used"))}/{fmt_num(st.get("n_clusters"))}',
                             f'{fmt_num(st.get("entropy_bits"))} / {fmt_num(st.get("max_entropy_bits"))}',
                             fmt_pct(st.get("top10_share")), fmt_pct(cp.get("cluster_purity")),
                             fmt_pct(cp.get("char_purity")), fmt_num(cp.get("mutual_information_bits")),
                             fmt_num(st.get("failed_utterances")), fmt_num(st.get("duration_mismatches"))])
        else:
            rows.append([str(it), "–", "–", "–", "labels not written yet"] + [""] * 7)
        series = collect.loss_series(workdir / f"iter{it}" / "train" / "tensorboard")
        if series:
            losses[f"iteration {it}"] = series
        usage = workdir / f"iter{it}" / "labels" / "cluster_usage.png"
        if usage.is_file():
            usage_imgs.append(f"<h3>Cluster usage, iteration {it}</h3>" + img(usage.read_bytes(), f"cluster usage iteration {it}"))
    ft_series = collect.loss_series(workdir / "finetune" / "tensorboard")
    if ft_series:
        losses["fine-tuning"] = ft_series
    out = ['<h3>Labels per iteration</h3>',
           table(["iteration", "targets", "K", "split", "clusters used", "entropy (bits) / max", "top-10 share",
                  "cluster purity", "char purity", "MI (bits)", "failed utts", "duration mismatches"], rows,
                 numeric=(2, 4, 5, 6, 7, 8, 9, 10, 11)),
           '<p class="note">Purity and mutual information compare the labels with the transcript\'s characters '
           'spread uniformly over each clip (labels stage report.json): a cheap reference for comparing '
           'iterations, present where the corpus has transcripts.</p>']
    if metric_rows:
        out.append(img(plots.label_metrics(metric_rows), "label metrics across iterations"))
    train_rows = []
    for it in iterations:
        s = train_steps.get(it)
        stage_done = None
        if s is not None:
            from pipeline.state import StateStore

            stage_done = (StateStore(workdir).read_stage_done("train", it) or {}).get("summary") or {}
        series = losses.get(f"iteration {it}", {})
        tr, va = series.get("train") or [], series.get("valid") or []
        train_rows.append([str(it), h(s.state if s else "not started"),
                           fmt_num((stage_done or {}).get("num_updates") or (tr[-1][0] if tr else None)),
                           fmt_num((stage_done or {}).get("world_size")),
                           fmt_num(tr[0][1] if tr else None), fmt_num(tr[-1][1] if tr else None),
                           fmt_num(va[-1][1] if va else None), fmt_duration((stage_done or {}).get("wall_s"))])
    out.append("<h3>Pretraining</h3>" + table(
        ["iteration", "state", "updates", "ranks", "first train loss", "last train loss", "last valid loss", "training wall time"],
        train_rows, numeric=(2, 3, 4, 5, 6, 7)))
    if losses:
        out.append(img(plots.loss_curves(losses), "loss curves"))
    if usage_imgs:
        out.append("<details><summary>Cluster usage per iteration</summary>" + "".join(usage_imgs) + "</details>")
    return "".join(out)


def _finetune_section(workdir: Path, out_dir: Path) -> str:
    path = workdir / "finetune" / "results.json"
    if not path.is_file():
        return '<p class="note">Fine-tuning has not written results yet.</p>'
    res = json.loads(path.read_text())
    rows, hyps = [], []
    for split, st in (res.get("splits") or {}).items():
        wer = st.get("wer")
        rows.append([h(split), "–" if wer is None else f"{wer:.1f}%", fmt_num(st.get("errors")),
                     fmt_num(st.get("ref_words")), fmt_num(st.get("utterances"))])
        for hy in (st.get("hypotheses") or [])[:HYPOTHESES_SHOWN]:
            ref, hyp = str(hy.get("ref", "")), str(hy.get("hyp", ""))
            errs, _ = word_errors(ref, hyp)
            hyps.append([h(split), h(hy.get("id")), h(ref), f'<span class="{"err" if errs else ""}">{h(hyp)}</span>',
                         f"{errs}/{len(ref.split())}"])
    gen = res.get("generation") or {}
    meta = [f"checkpoint <span class=\"path\">{h(res.get('checkpoint'))}</span>",
            f"pretrained from <span class=\"path\">{h(res.get('pretrained'))}</span>",
            f"modalities {h(_modalities(res.get('modalities')))}",
            f"updates {fmt_num(res.get('num_updates'))}",
            "generation " + ", ".join(f"{h(k)}={h(v)}" for k, v in gen.items())]
    return (table(["split", "WER", "errors", "reference words", "utterances"], rows, numeric=(1, 2, 3, 4))
            + f'<p class="note">{" · ".join(meta)}</p>'
            + (f"<h3>Hypotheses (first {HYPOTHESES_SHOWN} per split)</h3>"
               + table(["split", "id", "reference", "hypothesis", "word errors"], hyps, numeric=(4,)) if hyps else "")
            + (_guarded(f'{path} ("noise")', _noise_wer_html, res["noise"], out_dir, workdir / "finetune" / "noise_eval")
               if res.get("noise") else ""))


def _modalities(m) -> str:
    if isinstance(m, str):
        return {"av": "audio + video"}.get(m, m)
    return " + ".join(map(str, m or []))


def _disk_section(workdir: Path, scan) -> str:
    expected = {}
    if scan:
        for sub in ("crop/video", "crop/audio", "crop/landmarks"):
            expected[sub] = scan.ok
    entries = [e for e in collect.disk_usage(workdir, expected) if e.files]
    if not entries:
        return ""
    total = sum(e.bytes for e in entries)
    rows = [[f'<span class="path">{h(e.path)}</span>',
             ("~" if e.estimated else "≥ " if not e.complete else "") + fmt_bytes(e.bytes),
             ("~" if e.estimated else "≥ " if not e.complete else "") + fmt_num(e.files),
             fmt_pct(e.bytes / total if total else 0)] for e in entries]
    note = ""
    if any(e.estimated or not e.complete for e in entries):
        note = ('<p class="note">~: estimated from a sample of the files, scaled to the number of cropped items; '
                '≥: the walk stopped after its file budget.</p>')
    return table(["directory", "disk used", "files", "share"], rows, numeric=(1, 2, 3)) + \
        f'<p class="note">total {fmt_bytes(total)}</p>' + note


def _failures_section(steps, scan) -> str:
    failed = [(s, key, logp, err) for s in steps for key, logp, err in s.failed]
    if not failed:
        return '<p class="note ok">No failed shard.</p>'
    rows = [[h(_step_name(s)), h(key), f"<code>{h(err)}</code>", f'<span class="path">{h(logp)}</span>']
            for s, key, logp, err in failed[:FAILED_SHOWN]]
    more = len(failed) - FAILED_SHOWN
    return (table(["step", "shard", "last error line", "log"], rows)
            + (f'<p class="note">and {more:,} more failed shard(s): <code>python launch.py status</code> lists them.</p>'
               if more > 0 else "")
            + '<p class="note">Fix the cause and rerun the same command: complete shards are kept.</p>')


def _launch_section(workdir: Path, launch, launches) -> str:
    out = []
    if launch:
        rows = [["command", f"<code>{h(launch.get('command'))}</code>"],
                ["started", h(fmt_time(launch.get("start")))], ["ended", h(fmt_time(launch.get("end")))],
                ["duration", fmt_duration((launch.get("end") or 0) - (launch.get("start") or 0)) if launch.get("end") else "–"],
                ["exit status", h(launch.get("rc"))]]
        if launch.get("error"):
            rows.append(["error", f'<pre>{h(launch["error"])}</pre>'])
        out.append("<h3>Last launch</h3>" + table(["", ""], rows))
    else:
        out.append('<p class="note">No launch recorded (the report was written by <code>launch.py report</code>).</p>')
    if len(launches) > 1:
        rows = [[h(fmt_time(l.get("start"))), fmt_duration((l.get("end") or 0) - (l.get("start") or 0)),
                 h(l.get("rc")), f"<code>{h(l.get('command'))}</code>"] for l in reversed(launches)]
        out.append("<details><summary>Earlier launches</summary>" + table(["started", "duration", "exit", "command"], rows,
                                                                       numeric=(1, 2)) + "</details>")
    cfg_path = workdir / ".pipeline" / "config.yaml"
    if cfg_path.is_file():
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except OSError:
            text = ""
        out.append(f"<details><summary>Resolved configuration of the last launch "
                   f"({h(cfg_path)})</summary><pre>{h(text)}</pre></details>")
    return "".join(out)
