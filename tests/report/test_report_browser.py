"""The report of a real run, loaded in a real headless browser.

The sample-corpus smoke run (tests/conftest.py ``smoke_run``, copied: it is shared and read-only)
gets three more videos a user could drop into a corpus: a frozen frame with speech, a clip that
turns black halfway and a file that is not a video. ``launch.py --stage crop`` crops them with
the crop stage's code and writes the report at the end of the launch; Chromium loads it: no script
error, every image decoded, both bad clips flagged with their tiles, the broken file among the
failure reasons, and none of the 20 good clips flagged (the default bounds do not cry wolf).
A second, failing launch on a work dir with only crop results still gets its report.
"""
from __future__ import annotations

import json

import pytest

from report_helpers import add_noise_and_units, copy_workdir, launch, make_bad_clips, make_phone_clip, render

BAD = "zz_bad"  # sorts after the sample corpus's folders


@pytest.fixture(scope="module")
def run_with_bad_clips(smoke_run, sample_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_run")
    work = copy_workdir(smoke_run, root / "work")
    corpus = root / "corpus"
    for p in sample_corpus.rglob("*"):  # the sample corpus, file by file, plus the bad clips
        if p.is_file():
            (corpus / p.relative_to(sample_corpus)).parent.mkdir(parents=True, exist_ok=True)
            (corpus / p.relative_to(sample_corpus)).symlink_to(p)
    clips = make_bad_clips(sample_corpus / "pexels_langer" / "00.mp4", corpus / BAD)
    clips["phone"] = make_phone_clip(sample_corpus / "pexels_langer" / "00.mp4", corpus / BAD / "phone.mp4")
    for ext in (".mp4", ".mov"):  # two videos giving one id: a listing problem
        (corpus / BAD / f"dup{ext}").symlink_to(clips["broken"])
    noise = add_noise_and_units(work, sample_corpus, root)
    proc = launch("--stage", "crop", "--preset", "smoke", "--cluster", "local", "--workdir", str(work),
                  "--corpus", str(corpus))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc, clips, noise


def test_report_of_the_sample_run_in_a_browser(run_with_bad_clips, smoke_run, chromium, tmp_path):
    work, proc, _, noise = run_with_bad_clips
    index = work / "report" / "index.html"

    # the launcher's last lines name the report and the main outputs
    tail = proc.stdout.strip().splitlines()
    start = next(i for i, ln in enumerate(tail) if ln.startswith("report: "))
    assert tail[start] == f"report: {index}"
    named = "\n".join(tail[start:])
    for what, path in (("final pretrained checkpoint", "iter2/train/checkpoints/checkpoint_final.pt"),
                       ("k-means model, iteration 1", "iter1/kmeans/kmeans.joblib"),
                       ("fine-tuning results", "finetune/results.json")):
        assert f"  {what}: {work / path}" in named

    page = render(chromium, index, tmp_path / "report.png", tmp_path / "profile")
    print(f"screenshot: {page.screenshot}")
    assert page.console_errors == []
    assert page.check.get("errors") == [] and page.check.get("broken") == [], page.check
    # stage times, quality histograms, 2 flagged items' tiles, the sample sheet, label metrics,
    # loss curves, 2 cluster-usage plots, WER under noise
    assert page.check["images"] >= 10, page.check

    # flagged: exactly the two bad clips, with the right reasons, in the page and in flagged.tsv
    rows = (work / "report" / "flagged.tsv").read_text().splitlines()[1:]
    flagged = {r.split("\t")[0]: set(r.split("\t")[3].split(",")) for r in rows}
    assert set(flagged) == {f"{BAD}/frozen", f"{BAD}/black_half"}, flagged
    assert {"no_motion", "frozen"} <= flagged[f"{BAD}/frozen"]
    assert {"blank", "few_faces"} <= flagged[f"{BAD}/black_half"]
    dom = page.dom
    section = dom[dom.index('id="flagged"'):]
    for item in (f"{BAD}/frozen", f"{BAD}/black_half"):
        assert f'<div class="id">{item}</div><img class="tile" alt="tiles of {item}"' in section
    assert "mouth region does not move: motion" in section and "blank (uniform) ROI frames" in section
    # the broken file is a failure record with its reason, not a flagged crop
    assert f"{BAD}/broken" in dom and "cannot be decoded" in dom
    # the rest of the run: iterations, fine-tuning WER and hypotheses, stage times
    for text in ("Labels per iteration", "Pretraining", "Hypotheses (first", "reference words", "job time"):
        assert text in dom, text
    results = json.loads((work / "finetune" / "results.json").read_text())
    assert f'{results["splits"]["valid"]["wer"]:.1f}%' in dom

    # the corpus listing: the frozen list, what the last listing added, the duplicate id as a problem
    listing = json.loads((work / "crop" / "items" / "listing.json").read_text())
    assert listing["new"] == 5 and listing["problems"]["duplicate ids"]["count"] == 1
    crop = dom[dom.index('id="crop"'):dom.index('id="manifest"')]
    assert "Corpus listing" in crop and f"<td class=\"n\">{listing['listed']:,}</td>" in crop
    assert "Listing problems" in crop and f"2 videos give the id '{BAD}/dup'" in crop
    # the second video of the duplicate id is a path that is not an item, named in the report
    assert listing["ignored"]["duplicate id"] == {"count": 1, "examples": [f"{BAD}/dup.mov"]}
    assert "Not items (" in crop and f"{BAD}/dup.mov" in crop
    # the phone clip: turned upright (the rotation read from its crop record), and not flagged
    assert f"90° 1 (e.g. {BAD}/phone (90°))" in crop

    # noise: the stage's clips per category and split, the WER per category x SNR under noise
    part = dom[dom.index('id="noise"'):dom.index('id="iterations"')]
    summary = json.loads((work / "noise" / "summary.json").read_text())
    assert sorted(summary["categories"]) == ["babble", "hum"]
    for category, per in summary["categories"].items():
        assert f"<td>{category}</td>" in part
        assert f'{per["train"]["clips"]:,} (' in part
    part = dom[dom.index("WER under noise"):dom.index('id="units"')]
    for modality in ("audio", "audio + video"):
        assert f"<td>{modality}</td>" in part
    cells = noise["wer"]["test"]["audio"]["hum"]
    assert f'<td class="n">{cells["-5"]:.1f}%</td><td class="n">{cells["0"]:.1f}%</td>' in part
    assert cells["-5"] > cells["5"]

    # units: where they are, K, layer, per split done/failed, links that resolve
    part = dom[dom.index('id="units"'):dom.index('id="disk"')]
    units = json.loads((work / "units" / "summary.json").read_text())
    assert units["n_clusters"] == 20 and units["layer"] == 1
    assert "<td>layer</td><td>1</td>" in part and "<td>K (clusters)</td><td>20</td>" in part
    for split in ("valid", "test"):
        assert f'<td>{split}</td><td class="n">{units["splits"][split]["utterances"]}</td><td class="n">0</td>' in part
        for ext in ("units", "rle", "jsonl"):
            assert f'href="../units/{split}.{ext}"' in part and (work / "units" / f"{split}.{ext}").is_file()
    assert f"  units: {work / 'units'}" in named

    launches = [json.loads(ln) for ln in (work / "report" / "launches.jsonl").read_text().splitlines()]
    assert launches[-1]["rc"] == 0 and "--stage crop" in launches[-1]["command"]
    # the shared smoke run was not touched by the copy's launch
    assert len((smoke_run / "report" / "launches.jsonl").read_text().splitlines()) == 1
    assert not any(f"{BAD}/" in p.read_text() for p in (smoke_run / "crop" / "results").glob("*.jsonl"))


def test_a_failed_launch_on_a_fresh_work_dir_still_gets_its_report(run_with_bad_clips, chromium, tmp_path):
    """Only crop ran, and it failed (every item broken): the report names the failure."""
    _, _, clips, _ = run_with_bad_clips
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "clip.mp4").symlink_to(clips["broken"])
    work = tmp_path / "work"
    proc = launch("--stage", "crop", "--workdir", str(work), "--corpus", str(corpus), "manifest.valid_ids=null",
                  "manifest.test_ids=null", "manifest.valid_fraction=0", "manifest.test_fraction=0")
    assert proc.returncode == 2
    assert "error: crop: 1 of 1 items failed" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report: {work / 'report' / 'index.html'}"
    page = render(chromium, work / "report" / "index.html", tmp_path / "failed.png", tmp_path / "profile")
    assert page.console_errors == [] and page.check.get("errors") == [] and page.check.get("broken") == []
    dom = page.dom
    assert '<span class="badge failed">failed</span>' in dom
    assert "1 of 1 items failed" in dom and "cannot be decoded" in dom  # the launch's error and the reason
    assert "The manifest stage has not run yet." in dom and "Fine-tuning has not written results yet." in dom


def test_missing_or_malformed_files_cost_a_line_not_the_report(run_with_bad_clips, tmp_path, monkeypatch):
    """Each section is built from its own files: a truncated or nonsensical one is a line in its
    section; the rest of the page stands. The report opens no media (crop records only)."""
    import av

    from report import build

    work = copy_workdir(run_with_bad_clips[0], tmp_path / "work")
    (work / "noise" / "summary.json").write_text('{"categories": ')
    (work / "finetune" / "results.json").write_text("[1, 2")
    (work / "units" / "summary.json").write_text('{"splits": 3}')
    (work / "crop" / "items" / "listing.json").write_text("[]")

    def no_media(*args, **kwargs):
        raise AssertionError("the report opened a media file")

    monkeypatch.setattr(av, "open", no_media)
    page = build.build_report(work).path.read_text()
    assert page.count("This section could not be built from its files") == 4
    attention = page[page.index('id="problems"'):page.index('id="overview"')]
    for path in ("noise/summary.json", "finetune/results.json", str(work / "units")):
        assert f'the report could not read <span class="path">{path}' in attention, path
    for text in ("JSONDecodeError", "AttributeError", "listing.json: not a JSON object"):
        assert text in page, text
    for text in ("Flagged items (2)", "Labels per iteration", "90° 1", "Needs attention"):  # the rest stands
        assert text in page, text
