"""``WORKDIR/report/index.html``: one self-contained page about a work dir (every image inlined,
no script or font from the network, no server), plus ``flagged.tsv`` (every flagged item) and
``crop_sample.jpg`` (the corpus-level sample sheet) beside it.

It works on any work dir: a partial one (only crop done), a failed one (the failed shards with
their logs lead the page) and a 1.2M-item one (counts, the flagged list capped with a count,
sampled sheets; see report/collect.py for what each part costs).

This module only renders: ``report/collect.py`` reads the work dir into plain data, one function
per section; each section's template (``report/templates/sections/<anchor>.html``, Jinja2 with
autoescape on) turns it into HTML; ``plots.py`` draws the figures the templates ask for.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

import jinja2
from markupsafe import Markup

from pipeline import atomic
from report import collect, crop_scan, plots
from report.files import FLAGGED_TSV, INDEX, REPORT_DIR, SAMPLE_SHEET
from report.format import FILTERS

TEMPLATES = Path(__file__).with_name("templates")
TITLE = "AV-HuBERT pipeline report"


@dataclass
class Report:
    path: Path
    state: str  # complete | failed | running | incomplete | empty
    outputs: List[tuple] = field(default_factory=list)  # (what, path) of the main outputs that exist
    problems: List[tuple] = field(default_factory=list)  # the "Needs attention" lines (collect.Run.problem)


@dataclass(frozen=True)
class Section:
    """One section of the page: ``collect(run)`` reads its files into plain data (None: the
    section is left out), ``templates/sections/<anchor>.html`` renders it as ``data``. ``source``
    names its files as the user finds them, for the line shown when they cannot be read; ``write``
    puts files of its own beside the page (from the data, never from the work dir)."""
    anchor: str
    title: str
    collect: Callable[[collect.Run], Optional[dict]]
    source: Union[str, Callable[[collect.Run], str]]
    write: Optional[Callable[[dict, Path], None]] = None

    @property
    def template(self) -> str:
        return f"sections/{self.anchor}.html"

    def where(self, run: collect.Run) -> str:
        return self.source(run) if callable(self.source) else self.source


def write_crop_files(data: dict, out_dir: Path) -> None:
    """``flagged.tsv`` (every flagged item with its figures) and ``crop_sample.jpg``."""
    q = data.get("quality")
    if q is None:
        return
    lines = ["id\tshard\tsplit\tflags\t" + "\t".join(crop_scan.FLAGGED_FIGURES)]
    for f in q["flagged"]:
        lines.append("\t".join([f["id"], f["shard"], f.get("split", ""), ",".join(f["flags"])]
                               + [str(f["q"].get(k, "")) for k in crop_scan.FLAGGED_FIGURES]))
    atomic.write_text(out_dir / FLAGGED_TSV, "\n".join(lines) + "\n")
    if q["sample"] is not None:
        with atomic.atomic_open(out_dir / SAMPLE_SHEET, "wb") as f:
            f.write(q["sample"]["jpeg"])


# The page's sections in order. Adding one: a ``*_section(run)`` in collect.py, its template in
# templates/sections/, and a line here.
SECTIONS = (
    Section("overview", "Overview", collect.overview_section, "manifest/summary.json, finetune/results.json"),
    Section("progress", "Progress", collect.progress_section, ".pipeline/run_plan.json, .pipeline/state/"),
    Section("stages", "Stages", collect.stages_section, ".pipeline/state/"),
    Section("crop", "Crop", collect.crop_section, "crop/", write=write_crop_files),
    Section("manifest", "Manifest", collect.manifest_section, "manifest/"),
    Section("noise", "Noise", collect.noise_section, "noise/summary.json"),
    Section("iterations", "Iterations", collect.iterations_section, "iter*/"),
    Section("finetune", "Fine-tuning", collect.finetune_section, "finetune/results.json"),
    Section("units", "Units", collect.units_section, lambda run: ", ".join(map(str, run.units_dirs)) or "units/"),
    Section("disk", "Disk", collect.disk_section, lambda run: str(run.workdir)),
    Section("failures", "Failures & logs", collect.failures_section, ".pipeline/"),
    Section("launch", "Launch & config", collect.launch_section, "report/launches.jsonl"),
)


class _Environment(jinja2.Environment):
    def getattr(self, obj, attribute):
        """A key of a section's data before a dict method of the same name: ``data.items`` is the
        key "items", never ``dict.items`` (Jinja2 tries the attribute first)."""
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


def environment() -> jinja2.Environment:
    """The templates' environment: every value escaped, None shown as nothing, an unknown name an
    error (which costs its section one line, never the page)."""
    env = _Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                       undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       finalize=lambda v: "" if v is None else v)
    env.filters.update(FILTERS)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.tests["broken"] = lambda v: isinstance(v, collect.Broken)
    env.globals["plot"] = plots
    return env


def build_report(workdir: Path, launch: Optional[dict] = None) -> Report:
    """Write ``WORKDIR/report/index.html`` (and flagged.tsv, crop_sample.jpg); returns where, the
    run's state and its main outputs."""
    workdir = Path(workdir).resolve()
    (workdir / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    run = collect.read_run(workdir, launch)
    env = environment()
    parts = []
    for section in SECTIONS:
        html = render_section(env, run, section)
        if html:
            parts.append({"anchor": section.anchor, "title": section.title, "html": html})
    page = env.get_template("page.html").render(
        title=TITLE, state=run.state, workdir=workdir, cfg=run.cfg, sections=parts, problems=run.problems,
        written=time.time())
    path = run.out_dir / INDEX
    atomic.write_text(path, page)
    return Report(path, run.state, [(w, p) for w, p in run.outputs if Path(p).exists()], run.problems)


def render_section(env: jinja2.Environment, run: collect.Run, section: Section) -> Optional[Markup]:
    """The section's HTML (None: left out). Each section is built from its own files: one that
    cannot be read or makes no sense is one line naming them, also listed in "Needs attention";
    the rest of the page stands (and no traceback reaches the launcher's terminal)."""
    try:
        data = section.collect(run)
        if data is None:
            return None
        if section.write is not None:
            section.write(data, run.out_dir)
        return Markup(env.get_template(section.template).render(data=data))
    except Exception as e:  # noqa: BLE001 - a view of whatever is on disk; never the launch's failure
        bad = collect.broken(run, section.where(run), section.anchor, e)
        return Markup(env.get_template("macros.html").module.broken(bad))
