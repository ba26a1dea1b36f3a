"""One report per work dir: ``WORKDIR/report/index.html``, written at the end of every launch (also
a failed one) and by ``python launch.py report [--workdir DIR]``.

It knows the AV-HuBERT stages' outputs (crop records and contact sheets, labels' report.json,
TensorBoard logs, results.json), so it sits above the stages, not in the engine:
``report/collect.py`` reads a work dir into plain data, ``report/build.py`` renders it with the
Jinja2 templates of ``report/templates/`` and the figures of ``report/plots.py``. Importing this
package is cheap (the launcher does it for every launch): the renderer and what it imports
(numpy, Jinja2, the stages; matplotlib and OpenCV when drawn) load when a report is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from report.files import LAUNCHES, REPORT_DIR

log = logging.getLogger(__name__)


def write_report(workdir, launch: Optional[dict] = None):
    """Build the report of ``workdir``; returns a ``report.build.Report``."""
    from report.build import build_report  # deferred: numpy, Jinja2, the stages (see the docstring)

    return build_report(Path(workdir), launch)


def summary_lines(rep) -> List[str]:
    """The launcher's last lines: where the report is and the main outputs that exist."""
    lines = [f"report: {rep.path}"]
    for what, path in rep.outputs:
        lines.append(f"  {what}: {path}")
    return lines


def record_launch(workdir, argv: List[str], start: float, rc: int, error: Optional[str] = None) -> dict:
    """Append this launch to ``report/launches.jsonl`` (command, times, exit status, error) and
    return the record; the report shows the last one and the history."""
    rec = {"command": "python launch.py " + " ".join(shlex.quote(a) for a in argv), "cwd": os.getcwd(),
           "start": start, "end": time.time(), "rc": rc, "error": error}
    path = Path(workdir) / REPORT_DIR / LAUNCHES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one launch at a time holds the work dir
        f.write(json.dumps(rec) + "\n")
    return rec


def at_end_of_launch(workdir, argv: List[str], start: float, rc: int, error: Optional[str] = None) -> List[str]:
    """Called by ``launch.py`` after every launch that ran (success or not): records it, writes the
    report, returns the lines to print. A failure here is one warning line, never the launch's
    outcome (the report is a view; the run's results are on disk whatever happens to it)."""
    try:
        rec = record_launch(workdir, argv, start, rc, error)
        return summary_lines(write_report(workdir, rec))
    except KeyboardInterrupt:  # a second Ctrl-C while the report is written
        return [f"report not written (interrupted): `python launch.py report --workdir {workdir}` writes it"]
    except Exception as e:  # noqa: BLE001 - the run's own exit status must stand
        log.debug("report failed", exc_info=True)
        return [f"warning: the report of {workdir} could not be written ({type(e).__name__}: {e}); "
                f"try `python launch.py report --workdir {workdir}`"]


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="launch.py report",
                                description="Write WORKDIR/report/index.html: one self-contained page about a work dir "
                                            "(stages, times, crop quality, labels, losses, WER, disk, failures).")
    p.add_argument("--workdir", default="./work", help="the work dir (default: ./work)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(os.path.expanduser(a.workdir)).resolve()
    if not (workdir / ".pipeline").is_dir() and not (workdir / "crop").is_dir():
        print(f"error: {workdir} is not a work dir of this pipeline (no .pipeline/ or crop/ in it)", file=sys.stderr)
        return 1
    try:
        rep = write_report(workdir)
    except OSError as e:
        print(f"error: cannot write the report of {workdir}: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(rep)))
    return 0
