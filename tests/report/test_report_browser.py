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

from report_helpers import copy_workdir, launch, make_bad_clips, render

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
    proc = launch("--stage", "crop", "--preset", "smoke", "--cluster", "local", "--workdir", str(work),
                  "--corpus", str(corpus))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc, clips


def test_report_of_the_sample_run_in_a_browser(run_with_bad_clips, smoke_run, chromium, tmp_path):
    work, proc, _ = run_with_bad_clips
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
    # loss curves, 2 cluster-usage plots
    assert page.check["images"] >= 9, page.check

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

    launches = [json.loads(ln) for ln in (work / "report" / "launches.jsonl").read_text().splitlines()]
    assert launches[-1]["rc"] == 0 and "--stage crop" in launches[-1]["command"]
    # the shared smoke run was not touched by the copy's launch
    assert len((smoke_run / "report" / "launches.jsonl").read_text().splitlines()) == 1
    assert not any(f"{BAD}/" in p.read_text() for p in (smoke_run / "crop" / "results").glob("*.jsonl"))


def test_a_failed_launch_on_a_fresh_work_dir_still_gets_its_report(run_with_bad_clips, chromium, tmp_path):
    """Only crop ran, and it failed (every item broken): the report names the failure."""
    _, _, clips = run_with_bad_clips
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
