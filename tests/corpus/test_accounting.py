"""Every path under the corpus dir is an item or reported with the reason it is not one (plain,
lrs3 and vox2 layouts, with misplaced files), and two ids never share an output path. The
listing reads names only: empty files stand in for the videos."""
from __future__ import annotations

import json
import os
from pathlib import Path

from corpus_helpers import freeze_listing, stage_ctx, touch
from stages import item_list as il
from stages.corpus import output_clashes, scan_corpus
from stages.crop import CropStage, items_dir


def _accounted(corpus: Path, listing) -> None:
    """Every file under ``corpus`` is an item's video or transcript, or under an ignored path."""
    used = {os.fsdecode(Path(i.video).relative_to(corpus)) for i in listing.items}
    used |= {p[:-len(Path(p).suffix)] + ".txt" for p in used}
    ignored = [p for paths in listing.ignored.values() for p in paths]
    for path in corpus.rglob("*"):
        rel = path.relative_to(corpus).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        assert rel in used or any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in ignored), rel


def test_plain_layout_reports_every_file_that_is_not_an_item(tmp_path, capsys):
    corpus = tmp_path / "c"
    touch(corpus / "a.mp4")
    touch(corpus / "a.txt", b"hello\n")
    touch(corpus / "sub" / "b.MKV")
    touch(corpus / "notes.pdf")
    touch(corpus / "sub" / "orphan.txt", b"no video\n")
    touch(corpus / "dup.mp4")
    touch(corpus / "dup.mov")
    touch(corpus / ".cache" / "x.mp4")
    touch(corpus / ".DS_Store")
    touch(tmp_path / "elsewhere" / "y.mp4")
    (corpus / "linked").symlink_to(tmp_path / "elsewhere")
    touch(corpus / "valid.lst", b"a\n")
    ctx = stage_ctx(corpus, tmp_path / "work", manifest={"valid_ids": "valid.lst"})
    listing = scan_corpus(ctx.cfg)
    assert [i.id for i in listing.items] == ["a", "dup", "sub/b"]
    assert listing.ignored == {
        "hidden": [".DS_Store", ".cache/"], "id list": ["valid.lst"], "unknown extension": ["notes.pdf"],
        "symlinked directory": ["linked"], "text without a video": ["sub/orphan.txt"], "duplicate id": ["dup.mov"]}
    _accounted(corpus, listing)

    # the launch's lines, listing.json, ignored.tsv and status all say it
    lines = "\n".join(freeze_listing(CropStage(), ctx))
    idir = items_dir(ctx)
    assert f"7 paths under the corpus dir are not items (all of them: {idir / 'ignored.tsv'}):" in lines, lines
    assert "  1 unknown extension: notes.pdf" in lines and "  2 hidden: .DS_Store, .cache/" in lines
    report = il.read_listing_report(idir)
    assert report["ignored_total"] == 7
    assert report["ignored"]["text without a video"] == {"count": 1, "examples": ["sub/orphan.txt"]}
    tsv = (idir / "ignored.tsv").read_text().splitlines()
    assert len(tsv) == 7 and "duplicate id\tdup.mov" in tsv
    import launch

    capsys.readouterr()
    launch.main(["status", "--workdir", str(tmp_path / "work")])
    status = capsys.readouterr().out
    assert "corpus listing: 3 items listed, 7 paths under the corpus dir are not items" in status, status
    assert "    1 symlinked directory: linked" in status and "1 duplicate ids (failure records" in status
    from report.build import build_report

    html = build_report(tmp_path / "work").path.read_text()
    assert "Not items (7 paths under the corpus dir)" in html and "<td>text without a video</td>" in html
    assert "sub/orphan.txt" in html and 'href="../crop/items/ignored.tsv"' in html, html


def test_lrs3_layout_reports_files_outside_it(tmp_path):
    corpus = tmp_path / "lrs3"
    for part in ("pretrain", "test"):
        touch(corpus / part / "spk1" / "00001.mp4")
        touch(corpus / part / "spk1" / "00001.txt", b"Text:  HELLO\n")
    touch(corpus / "pretrain" / "loose.mp4")  # above the speaker level
    touch(corpus / "pretrain" / "spk1" / "deeper" / "00002.mp4")  # below it
    touch(corpus / "pretrain" / "spk1" / "00003.avi")  # lrs3 is mp4 only
    touch(corpus / "extra" / "spk9" / "00001.mp4")  # not a part of the layout
    touch(corpus / "README")
    listing = scan_corpus(stage_ctx(corpus, tmp_path / "w", layout="lrs3").cfg)
    assert [i.id for i in listing.items] == ["pretrain/spk1/00001", "test/spk1/00001"]
    assert listing.ignored == {
        "outside the layout": ["extra/", "README", "pretrain/loose.mp4", "pretrain/spk1/deeper/"],
        "unknown extension": ["pretrain/spk1/00003.avi"]}
    _accounted(corpus, listing)


def test_vox2_layout_with_both_shapes_lists_every_video(tmp_path):
    """``dev/mp4/<spk>/<clip>/`` and ``dev/<spk>/<clip>/`` in one copy: all five videos are
    accounted for, the utterance present in both shapes is one item that fails as a duplicate."""
    corpus = tmp_path / "vox2"
    touch(corpus / "dev" / "mp4" / "id001" / "clipA" / "00001.mp4")
    touch(corpus / "dev" / "mp4" / "id001" / "clipA" / "00002.mp4")
    touch(corpus / "dev" / "id001" / "clipA" / "00001.mp4")  # the same utterance in the other shape
    touch(corpus / "dev" / "id002" / "clipB" / "00001.mp4")
    touch(corpus / "test" / "id003" / "clipC" / "00001.mp4")
    touch(corpus / "dev" / "aac" / "id001" / "clipA" / "00001.m4a")  # VoxCeleb2's audio tree
    touch(corpus / "dev" / "id002" / "clipB" / "00001.txt")  # vox2 has no transcripts
    listing = scan_corpus(stage_ctx(corpus, tmp_path / "w", layout="vox2").cfg)
    items = {i.id: i for i in listing.items}
    assert sorted(items) == ["dev/id001/clipA/00001", "dev/id001/clipA/00002", "dev/id002/clipB/00001",
                             "test/id003/clipC/00001"]
    assert "2 videos give the id 'dev/id001/clipA/00001'" in items["dev/id001/clipA/00001"].error
    assert listing.ignored == {"outside the layout": ["dev/aac/"], "unknown extension": ["dev/id002/clipB/00001.txt"],
                               "duplicate id": ["dev/mp4/id001/clipA/00001.mp4"]}
    _accounted(corpus, listing)


def test_two_ids_on_one_output_path_both_fail_naming_each_other(tmp_path):
    """``col.mp4`` and ``col.wav/x.mp4``: ``crop/audio/col.wav`` would be both an audio file and
    a directory. Found when the corpus is listed; both items are failure records naming the other
    (neither is cropped, whichever shard would run first); a third id is untouched."""
    corpus = tmp_path / "c"
    touch(corpus / "col.mp4")
    touch(corpus / "col.wav" / "x.mp4")
    touch(corpus / "other.mp4")
    ctx = stage_ctx(corpus, tmp_path / "work", items_per_shard=1)
    stage = CropStage()
    lines = "\n".join(freeze_listing(stage, ctx))
    assert "2 output path clashes (failure records)" in lines, lines
    items = {i.id: i for s in stage.shards(ctx) for i in stage.shard_items(ctx, s)}
    assert set(items) == {"col", "col.wav/x", "other"} and items["other"].error is None
    assert "'col.wav/x'" in items["col"].error and "'col'" in items["col.wav/x"].error
    assert "rename one of the videos" in items["col"].error
    for shard in reversed(stage.shards(ctx)):  # the later shard first: same records
        if any(i.error for i in stage.shard_items(ctx, shard)):
            stage.run(ctx, shard)
    recs = [json.loads(line) for f in sorted((ctx.stage_dir("crop") / "results").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sorted((r["id"], r["status"]) for r in recs) == [("col", "failed"), ("col.wav/x", "failed")]
    assert not any((ctx.stage_dir("crop") / kind).exists() for kind in ("video", "audio", "landmarks"))


def test_output_clashes_on_case_insensitive_filesystems():
    clashes = output_clashes(["Talk", "talk", "café", "cafe\u0301", "a.npz/b", "a", "ok"], [".mp4", ".wav", ".npz"])
    assert {k: [o for o, _ in v] for k, v in clashes.items()} == {
        "Talk": ["talk"], "talk": ["Talk"], "café": ["cafe\u0301"], "cafe\u0301": ["café"],
        "a.npz/b": ["a"], "a": ["a.npz/b"]}
    assert output_clashes(["a", "b/c", "a.b/c"], [".mp4"]) == {}


def test_videos_left_out_by_include_ids_are_reported(tmp_path):
    corpus = tmp_path / "c"
    for name in ("a", "b", "c"):
        touch(corpus / f"{name}.mp4")
    touch(corpus / "english.lst", b"a\nc\n")
    listing = scan_corpus(stage_ctx(corpus, tmp_path / "w", manifest={"include_ids": "english.lst"}).cfg)
    assert [i.id for i in listing.items] == ["a", "c"]
    assert listing.ignored == {"id list": ["english.lst"], "not in manifest.include_ids": ["b.mp4"]}
    _accounted(corpus, listing)
