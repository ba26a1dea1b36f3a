"""The names of the report's own files, in ``WORKDIR/report/`` (a leaf module: the launcher's
``report`` package reads them without importing the renderer)."""
from __future__ import annotations

REPORT_DIR = "report"
INDEX = "index.html"
FLAGGED_TSV = "flagged.tsv"  # every flagged item with its figures
SAMPLE_SHEET = "crop_sample.jpg"  # the corpus-level sample sheet
LAUNCHES = "launches.jsonl"  # one line per launch: command, times, exit status, error
CROP_CACHE = "crop_scan.json"  # the per-shard summary of the crop records
