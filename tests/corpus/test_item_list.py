"""The frozen item list: listed once per launch, shards are slices of it that never change
meaning, new videos become new shards, removed/changed sources are reported, and per-item
problems (duplicate ids, undecodable names or transcripts) never refuse the corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from stages import item_list as il
from stages.corpus import escape_id, list_items, scan_corpus, unescape_id
from stages.crop import CropStage, items_dir

from corpus_helpers import freeze_listing, stage_ctx, touch

REPO_ROOT = Path(__file__).resolve().parents[2]


def vox2_tree(root: Path, n: int, first: int = 0) -> list[str]:
    ids = []
    for k in range(first, first + n):
        rel = f"dev/id{k // 40:03d}/clip{k // 8:04d}/{k % 8:05d}"
        touch(root / f"{rel}.mp4")
        ids.append(rel)
    return ids


def test_a_shard_reads_only_its_slice_and_never_lists_the_corpus(tmp_path, scandir_counter):
    corpus, work = tmp_path / "vox2", tmp_path / "work"
    ids = vox2_tree(corpus, 1000)
    ctx = stage_ctx(corpus, work, "vox2", items_per_shard=50)
    stage = CropStage()
    freeze_listing(stage, ctx)
    listing_reads = scandir_counter.calls
    assert listing_reads >= 1000 // 8  # one read per directory (125 clip dirs, 25 speakers, dev)

    scandir_counter.calls = 0
    shards = stage.shards(ctx)
    assert len(shards) == 20 and scandir_counter.calls == 0
    index_bytes = (items_dir(ctx) / "index.json").stat().st_size
    assert index_bytes < 4000  # shard boundaries, not items
    last = shards[-1]
    assert last.params["length"] < 50 * 200  # the slice of 50 items, not the 1000-item batch
    # the last shard (empty files: 50 failure records) reads its slice and lists nothing
    stats = CropStage().run(ctx, last)
    assert scandir_counter.calls == 0
    assert stats["items"] == 50 and stats["failed"] == 50
    recs = [json.loads(x) for x in (work / "crop/results" / f"{last.key}.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == sorted(ids)[-50:]
    assert all(r["reason"].endswith(": empty file (0 bytes)") for r in recs)


def test_a_dry_run_writes_nothing_but_answers_shards(tmp_path):
    corpus, work = tmp_path / "c", tmp_path / "work"
    for name in ("a", "b", "c"):
        touch(corpus / f"{name}.mp4")
    ctx = stage_ctx(corpus, work, items_per_shard=2)
    stage = CropStage()
    lines = stage.prepare(ctx, commit=False)
    assert any("would freeze the item list: 3 items in 2 shards" in line for line in lines), lines
    assert [s.key for s in stage.shards(ctx)] == ["00000", "00001"]
    assert not work.exists()
    freeze_listing(stage, ctx)
    assert (items_dir(ctx) / "index.json").is_file()
    assert [s.key for s in CropStage().shards(ctx)] == ["00000", "00001"]


def _slices(stage, ctx) -> dict:
    return {s.key: [i.id for i in stage.shard_items(ctx, s)] for s in stage.shards(ctx)}


def test_new_videos_become_new_shards_and_frozen_shards_keep_their_meaning(tmp_path):
    corpus, work = tmp_path / "c", tmp_path / "work"
    for name in ("m1", "m2", "m3", "m4", "m5"):
        touch(corpus / f"{name}.mp4", b"x" * 10)
    ctx = stage_ctx(corpus, work, items_per_shard=2)
    stage = CropStage()
    freeze_listing(stage, ctx)
    before = _slices(stage, ctx)
    assert before == {"00000": ["m1", "m2"], "00001": ["m3"], "00002": ["m4", "m5"]}

    # new videos whose names sort first, one source removed, one rewritten
    for name in ("a1", "a2", "a3"):
        touch(corpus / f"{name}.mp4", b"y" * 10)
    (corpus / "m2.mp4").unlink()
    touch(corpus / "m4.mp4", b"z" * 20)
    lines = freeze_listing(CropStage(), ctx)
    text = "\n".join(lines)
    assert "froze 3 new items: 3 items in 2 shards (shards 00003-00004)" in text, text
    assert "1 frozen items are gone from the corpus (e.g. m2)" in text and "manifest.drop_removed" in text
    assert "1 frozen items changed since they were listed (e.g. m4: m4.mp4 was modified (size 10 -> 20))" in text
    after = _slices(stage, ctx)
    assert {k: after[k] for k in before} == before  # completed shards never change meaning
    assert sorted(after["00003"] + after["00004"]) == ["a1", "a2", "a3"]
    assert (items_dir(ctx) / "removed.txt").read_text() == "m2\n"
    assert (items_dir(ctx) / "changed.txt").read_text() == "m4\n"
    assert il.read_listing_report(items_dir(ctx)) == {
        "listed": 7, "frozen_before": 5, "new": 3, "replanned": 0, "removed": 1, "changed": 1,
        "removed_examples": ["m2"], "changed_examples": [["m4", "m4.mp4 was modified (size 10 -> 20)"]],
        "problems": {}, "ignored_total": 0, "ignored": {}}
    again = "\n".join(freeze_listing(CropStage(), ctx))
    assert "no new items (frozen: 8 items in 5 shards)" in again


def test_a_duplicate_id_fails_once_and_is_planned_again_when_resolved(tmp_path):
    corpus, work = tmp_path / "c", tmp_path / "work"
    touch(corpus / "a.mp4")
    touch(corpus / "a.mov")
    touch(corpus / "b.mp4")
    ctx = stage_ctx(corpus, work, items_per_shard=5)
    lines = "\n".join(freeze_listing(CropStage(), ctx))
    assert "1 duplicate ids (failure records): 2 videos give the id 'a' (a.mp4, a.mov)" in lines
    # kept for the run report: a count and the first messages per kind
    assert il.read_listing_report(items_dir(ctx))["problems"] == {
        "duplicate ids": {"count": 1, "examples": ["2 videos give the id 'a' (a.mp4, a.mov): none is used; rename "
                                                   "all but one (or move it out of the corpus)"]}}
    stage = CropStage()
    (item_a, item_b), = [stage.shard_items(ctx, s) for s in stage.shards(ctx)]
    assert item_a.error and item_b.error is None
    (corpus / "a.mov").rename(corpus / "a2.mov")
    lines = "\n".join(freeze_listing(CropStage(), ctx))
    assert "froze 2 new items (1 planned again: their problem is gone)" in lines
    new = stage.shard_items(ctx, stage.shards(ctx)[-1])
    assert [(i.id, i.error) for i in new] == [("a", None), ("a2", None)]


def test_undecodable_names_and_transcripts(tmp_path):
    corpus = tmp_path / "c"
    touch(os.fsencode(corpus) + b"/caf\xe9 50%.mp4")
    touch(os.fsencode(corpus) + b"/caf\xe9 50%.txt", "Text:  DEUX CAFÉS\n".encode())
    touch(corpus / "latin.mp4")
    touch(corpus / "latin.txt", "caf\xe9 au lait".encode("latin-1"))
    listing = scan_corpus(stage_ctx(corpus, tmp_path / "w").cfg)
    by_id = {i.id: i for i in listing.items}
    assert set(by_id) == {"caf%E9 50%25", "latin"}
    good = by_id["caf%E9 50%25"]
    assert good.error is None and good.text == "DEUX CAFÉS"
    assert os.fsencode(good.video).endswith(b"/caf\xe9 50%.mp4")  # the source path, exactly
    assert unescape_id(good.id) == os.fsdecode(b"caf\xe9 50%")
    assert by_id["latin"].error.startswith("transcript ") and \
        "latin.txt is not valid UTF-8 (byte 0xe9 at offset 3)" in by_id["latin"].error
    assert by_id["latin"].text is None  # never guessed
    assert listing.problem_lines() == [f"1 unusable transcripts (failure records): {by_id['latin'].error}"]


@pytest.mark.parametrize("name", ["plain", "caf\udce9", "50%", "tab\there", "a/b\nc", "%E9", "ü/ß"])
def test_ids_are_escaped_reversibly_into_valid_utf8(name):
    item_id = escape_id(name)
    item_id.encode("utf-8")  # no surrogates left
    assert "\t" not in item_id and "\n" not in item_id
    assert unescape_id(item_id) == name


def test_lrs3_transcripts_parsed_in_a_pool_match_the_serial_parse(tmp_path, monkeypatch):
    import stages.corpus as corpus_module

    root = tmp_path / "lrs3"
    for k in range(12):
        words = [(f"W{j}", 0.1 + 0.4 * j + (1.0 if j >= 30 else 0.0), 0.4 + 0.4 * j + (1.0 if j >= 30 else 0.0))
                 for j in range(20 + 3 * k)]
        table = "".join(f"{w} {s:.2f} {e:.2f} 1.0\n" for w, s, e in words)
        touch(root / f"pretrain/spk{k % 3}/{k:05d}.mp4")
        touch(root / f"pretrain/spk{k % 3}/{k:05d}.txt",
              f"Text:  {' '.join(w for w, _, _ in words)}\nConf:  3\n\nWORD START END ASDSCORE\n{table}".encode())
    cfg = stage_ctx(root, tmp_path / "w", "lrs3").cfg
    serial = list_items(cfg)
    monkeypatch.setattr(corpus_module, "PARALLEL_MIN_TRANSCRIPTS", 1)
    monkeypatch.setattr(corpus_module, "PARALLEL_MIN_CPUS", 2)
    monkeypatch.setattr(corpus_module.os, "sched_getaffinity", lambda pid: {0, 1})
    assert list_items(cfg) == serial
    assert len(serial) > 12  # the long ones were segmented


def test_a_changed_layout_is_refused(tmp_path):
    corpus, work = tmp_path / "c", tmp_path / "work"
    vox2_tree(corpus, 8)
    freeze_listing(CropStage(), stage_ctx(corpus, work, "vox2"))
    with pytest.raises(ConfigError, match="frozen from a 'vox2' corpus"):
        freeze_listing(CropStage(), stage_ctx(corpus, work, "plain"))


def test_the_listing_does_not_import_the_manifest_stage():
    code = ("import sys; import stages.corpus, stages.item_list; "
            "assert 'stages.manifest' not in sys.modules, sorted(m for m in sys.modules if m.startswith('stages'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_shows_corpus_problems_and_errors(tmp_path):
    corpus = tmp_path / "c"
    touch(corpus / "a.mp4")
    touch(corpus / "a.mkv")
    touch(corpus / "b.mp4")
    launch = [sys.executable, str(REPO_ROOT / "launch.py"), "--stage", "crop", "--dry-run", "--workdir",
              str(tmp_path / "work"), "--corpus"]
    t0 = time.time()
    # the smoke preset's split lists are the sample corpus's
    plain = ["manifest.valid_ids=null", "manifest.test_ids=null", "manifest.valid_fraction=0",
             "manifest.test_fraction=0"]
    ok = subprocess.run(launch + [str(corpus)] + plain, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 duplicate ids (failure records): 2 videos give the id 'a' (a.mp4, a.mkv)" in ok.stdout
    assert "would freeze the item list: 2 items in 1 shards" in ok.stdout
    assert not (tmp_path / "work").exists()
    (tmp_path / "empty").mkdir()
    bad = subprocess.run(launch + [str(tmp_path / "empty")] + plain, capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=120)
    assert bad.returncode == 2 and "error: corpus: no videos found" in bad.stderr, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    print(f"two dry runs: {time.time() - t0:.1f} s")
