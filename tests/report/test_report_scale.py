"""The report of a large crop run (fabricated records in the crop stage's format; the full-size
figures come from bench/report_scale.py): counts instead of items, the flagged list capped with a
count, every flagged item in flagged.tsv, a per-shard cache, flags re-evaluated with the current
bounds, job times from sampled markers, disk use estimated beyond a file budget."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from avprep import quality
from report import build, collect, crop_scan, disk, steps

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fabricator():
    spec = importlib.util.spec_from_file_location("bench_report_scale", REPO_ROOT / "bench" / "report_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    work = tmp_path_factory.mktemp("large") / "work"
    counts = _fabricator().fabricate(work, 6000, 50, flagged_share=0.05, failed_share=0.02)
    return work, counts


def test_counts_capped_flagged_list_and_flagged_tsv(large):
    work, counts = large
    t = time.perf_counter()
    rep = build.build_report(work)
    print(f"report of {counts['items']:,} items in {counts['shards']} shards: {time.perf_counter() - t:.1f} s")
    page = rep.path.read_text()
    assert len(page) < 2_500_000  # the items are not in the page
    assert page.count('class="flag-item"') == collect.FLAGGED_SHOWN
    assert f"{collect.FLAGGED_SHOWN} of {counts['flagged']:,} flagged items shown" in page
    assert f'<div class="v">{counts["ok"]:,}</div>' in page and f"of {counts['items']:,}" in page
    rows = (work / "report" / "flagged.tsv").read_text().splitlines()
    assert len(rows) == counts["flagged"] + 1 and rows[0].startswith("id\tshard\tsplit\tflags")
    # every kind of flag is among those shown, not only the first shards' items
    shown = page[page.index('id="flagged"'):]
    for code in ("frozen", "blank", "small_face", "few_faces"):
        assert f"crop.quality.{quality.FLAGS[code][1]}=" in shown, code
    # failure reasons grouped without their file names and numbers
    assert "no face found in any of its N frames" in page
    assert page.count("no face found in any of its N frames") == 1
    assert rep.state == "incomplete"  # crop markers only, no stage marker: not finalized


def test_the_crop_scan_is_cached_per_shard(large, tmp_path):
    work, counts = large
    cache = tmp_path / "scan.json"
    bounds = quality.QualityBounds()
    first = crop_scan.scan_crop(work / "crop", cache, bounds)
    assert first.shards_read == counts["shards"] and first.items == counts["items"]
    again = crop_scan.scan_crop(work / "crop", cache, bounds)
    assert again.shards_read == 0 and again.items == counts["items"] and again.n_flagged == first.n_flagged
    # one shard rewritten with one more (frozen) item: only it is read again
    shard = work / "crop" / "results" / "00007.jsonl"
    saved = shard.read_bytes()
    try:
        q = {"face_share": 1.0, "face_px": 100.0, "motion": 0.0, "static_share": 1.0, "brightness": 120.0,
             "contrast": 30.0, "blank_share": 0.0, "jitter": 0.1, "roll_deg": 0.0, "flags": ["frozen"], "sheet_index": 0}
        shard.write_bytes(saved + (json.dumps({"id": "x/new", "split": "train", "status": "ok", "n_frames": 50,
                                               "quality": q}) + "\n").encode())
        third = crop_scan.scan_crop(work / "crop", cache, bounds)
        assert third.shards_read == 1 and third.items == counts["items"] + 1
        assert third.n_flagged == first.n_flagged + 1
        # other bounds: every shard is evaluated again, with more items flagged
        strict = crop_scan.scan_crop(work / "crop", cache, quality.QualityBounds(min_motion=5.0))
        assert strict.shards_read == counts["shards"] and strict.flag_counts["no_motion"] > 0.2 * counts["ok"]
    finally:
        shard.write_bytes(saved)


def test_job_times_from_sampled_markers(large, monkeypatch):
    work, counts = large
    exact = sum(100.0 + s % 7 for s in range(counts["shards"]))  # what the fabricator recorded
    (step,) = [s for s in steps.collect_steps(work, ["crop"]) if s.stage == "crop"]
    assert step.job_seconds == pytest.approx(exact) and not step.job_seconds_estimated
    assert step.done == counts["shards"] and step.state == "incomplete"
    monkeypatch.setattr(steps, "MARKERS_READ", 20)
    (sampled,) = steps.collect_steps(work, ["crop"])
    assert sampled.job_seconds_estimated and sampled.job_seconds == pytest.approx(exact, rel=0.02)


def test_disk_use_beyond_the_file_budget_is_estimated(tmp_path):
    work = tmp_path / "work"
    video = work / "crop" / "video" / "spk"
    video.mkdir(parents=True)
    for i in range(30):
        (video / f"{i}.mp4").write_bytes(b"x" * 10000)
    (work / "manifest").mkdir()
    (work / "manifest" / "train.tsv").write_text("/root\n")
    exact = {e.path: e for e in disk.disk_usage(work, {})}
    assert exact["crop/video"].files == 30 and exact["crop/video"].complete
    budget = {e.path: e for e in disk.disk_usage(work, {"crop/video": 300}, max_files=10)}
    v = budget["crop/video"]
    assert v.estimated and v.files == 300 and v.bytes == pytest.approx(10 * exact["crop/video"].bytes, rel=0.01)
    assert budget["manifest"].complete


def test_reason_groups():
    g = crop_scan.reason_group("/data/vox2/dev/id001/a b/00001.mp4: no face found in any of its 153 frames")
    assert g == "no face found in any of its N frames"
    assert crop_scan.reason_group("/x/y.mp4: cannot be decoded (InvalidDataError: '/x/y.mp4')") == \
        "cannot be decoded (InvalidDataError: '<file>')"


def test_report_command_and_end_of_launch_errors(tmp_path, capsys):
    import report

    assert report.main(["--workdir", str(tmp_path)]) == 1
    assert "is not a work dir of this pipeline" in capsys.readouterr().err
    # the report never decides a launch's outcome: a failure to write it is one warning line
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    lines = report.at_end_of_launch(not_a_dir, ["--stage", "crop"], 0.0, 0)
    assert len(lines) == 1 and lines[0].startswith(f"warning: the report of {not_a_dir} could not be written")
