"""The report's layout (docs/DESIGN.md, "The report"): the launcher's ``import report`` loads no
renderer, every section template has its line in ``build.SECTIONS`` (and the reverse), and a
section whose template cannot render its data costs that section one line, never the page."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from report import build, collect

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_report_loads_no_renderer():
    code = ("import sys, report\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jinja2', 'markupsafe', 'numpy', 'matplotlib', 'cv2', 'torch', 'stages', 'omegaconf'))\n"
            "own = sorted(m for m in sys.modules if m.startswith('report.'))\n"
            "print(heavy, own)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] ['report.files']", out.stdout


def test_every_section_template_has_its_section():
    templates = {p.stem for p in (build.TEMPLATES / "sections").glob("*.html")}
    anchors = [s.anchor for s in build.SECTIONS]
    assert len(anchors) == len(set(anchors))
    assert templates == set(anchors)
    for s in build.SECTIONS:
        assert s.collect is getattr(collect, f"{s.anchor}_section"), s.anchor


def test_a_template_that_cannot_render_its_data_costs_one_line(tmp_path):
    work = tmp_path / "work"
    (work / "report").mkdir(parents=True)
    run = collect.read_run(work)
    env = build.environment()
    # the disk template needs data.total: missing, the strict environment raises while rendering
    section = build.Section("disk", "Disk", lambda run: {"entries": [], "approximate": False}, "somewhere/")
    html = str(build.render_section(env, run, section))
    assert html.startswith('<p class="note bad">This section could not be built from its files')
    assert '<span class="path">somewhere/</span>' in html and "UndefinedError" in html
    assert len(run.problems) == 1 and run.problems[0][1] == collect.FilePath("somewhere/")
    # the same section with its data renders
    whole = build.Section("disk", "Disk", lambda run: {"entries": [], "approximate": False, "total": 0}, "x")
    assert "could not be built" not in build.render_section(env, run, whole)


def test_a_key_of_the_data_comes_before_a_dict_method():
    env = build.environment()
    assert env.from_string("{{ data.items }} {{ data.values|length }}").render(data={"items": 3, "values": [1, 2]}) == "3 2"
    assert env.from_string("{{ x }}|{{ '<b>' }}").render(x=None) == "|&lt;b&gt;"  # None is nothing; text escaped
