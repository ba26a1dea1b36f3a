"""What a work dir holds is text, never markup: an item id, a failure reason, a transcript or an
error line carrying HTML is shown as written, escaped by the templates, and a script in it never
runs (checked in the page's source and in a real headless Chromium)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from report import build
from report_helpers import render

# no digits or quotes: the crop's reason groups keep it whole, and its escaped form is the same
# whichever escaper wrote it
HOSTILE = "<script>document.body.remove()</script> & <b>bold</b>"
ESCAPED = html.escape(HOSTILE)


@pytest.fixture
def hostile_work(tmp_path) -> Path:
    """A work dir whose crop records, fine-tuning results, corpus listing and launch record carry
    ``HOSTILE`` (an item id as a file name can make it, a failure reason, a transcript)."""
    work = tmp_path / "work"
    results = work / "crop" / "results"
    results.mkdir(parents=True)
    frozen = {"face_share": 1.0, "face_px": 120.0, "jitter": 0.2, "roll_deg": 0.0, "motion": 0.0, "static_share": 1.0,
              "brightness": 120.0, "contrast": 30.0, "blank_share": 0.0, "rotation": 0, "sheet_index": 0,
              "flags": ["no_motion", "frozen"]}
    records = [{"id": f"spk/{HOSTILE}", "split": "train", "status": "ok", "n_frames": 50, "quality": frozen},
               {"id": f"bad/{HOSTILE}", "status": "failed", "reason": f"/corpus/bad/x.mp4: {HOSTILE}"}]
    (results / "00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    items = work / "crop" / "items"
    items.mkdir()
    (items / "listing.json").write_text(json.dumps({"listed": 2, "problems": {
        "duplicate ids": {"count": 1, "examples": [f"2 videos give the id {HOSTILE}"]}}}))
    (work / "finetune").mkdir()
    (work / "finetune" / "results.json").write_text(json.dumps({"splits": {"test": {
        "wer": 50.0, "errors": 2, "ref_words": 4, "utterances": 1,
        "hypotheses": [{"id": f"spk/{HOSTILE}", "ref": f"hello {HOSTILE}", "hyp": f"hello {HOSTILE} there"}]}}}))
    (work / "report").mkdir()
    (work / "report" / "launches.jsonl").write_text(json.dumps(
        {"command": "python launch.py --stage crop", "cwd": "/", "start": 1.0, "end": 2.0, "rc": 2,
         "error": f"error: crop: {HOSTILE}"}) + "\n")
    return work


def test_hostile_text_from_the_work_dir_is_escaped(hostile_work):
    page = build.build_report(hostile_work).path.read_text()
    assert "This section could not be built" not in page
    # no markup of the work dir's text reaches the page: the only script is the self-check
    assert page.count("<script>") == 1 and "<b>bold</b>" not in page and "document.body.remove()</script>" not in page
    for shown in (f'<div class="id">spk/{ESCAPED}</div>',  # the flagged item's id
                  f"<td>bad/{ESCAPED}</td>",  # the failure reason's example item
                  f'<span class="path">/corpus/bad/x.mp4: {ESCAPED}</span>',  # the reason itself
                  f"2 videos give the id {ESCAPED}",  # a listing problem
                  f"<td>hello {ESCAPED}</td>",  # the reference transcript
                  f'<span class="err">hello {ESCAPED} there</span>',  # the hypothesis
                  f"<pre>error: crop: {ESCAPED}</pre>",  # the launch's error
                  f"<code>error: crop: {ESCAPED}</code>"):  # ... and its first line in "Needs attention"
        assert shown in page, shown


def test_hostile_text_does_not_run_in_a_browser(hostile_work, chromium, tmp_path):
    index = build.build_report(hostile_work).path
    page = render(chromium, index, tmp_path / "hostile.png", tmp_path / "profile")
    assert page.console_errors == [] and page.check.get("errors") == [] and page.check.get("broken") == []
    dom = page.dom
    assert 'id="launch"' in dom  # the injected script did not remove the body
    assert "<b>bold</b>" not in dom and dom.count("&lt;b&gt;bold&lt;/b&gt;") >= 6  # shown as text
