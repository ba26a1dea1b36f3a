"""Corpus layouts (stages/corpus.py) on tiny fake trees: enumeration, ids, transcripts, LRS3
pretrain segmentation, and split assignment from id lists or seeded fractions."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.errors import ConfigError
from stages.corpus import list_items, read_transcript, read_word_table, segment_words, split_draw


def _cfg(root: Path, layout: str, **manifest) -> OmegaConf:
    return OmegaConf.create({"corpus": str(root), "layout": layout, "manifest": manifest})


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _lrs3_txt(words: list[tuple[str, float, float]], conf: int = 4) -> str:
    head = f"Text:  {' '.join(w for w, _, _ in words)}\nConf:  {conf}\n\nWORD START END ASDSCORE\n"
    return head + "".join(f"{w} {s:.2f} {e:.2f} 5.1\n" for w, s, e in words)


def _continuous(n_words: int, start: float = 0.1, word: float = 0.3, gap: float = 0.1, pauses=()):
    """Words of ``word`` s separated by ``gap`` s; ``pauses`` = {index: extra seconds before it}."""
    words, t = [], start
    for i in range(n_words):
        t += dict(pauses).get(i, 0.0)
        words.append((f"W{i}", round(t, 2), round(t + word, 2)))
        t += word + gap
    return words


def _drawn(groups, seed: int, low: float, high: float) -> set:
    """The groups the seeded per-video rule puts in [low, high) (without the tiny-corpus
    fallback)."""
    return {g for g in groups if low <= split_draw(seed, g) < high}


def _span(piece, words_by_name):
    """(start, end) used to measure a piece: its boundaries, 0 and the last word's end at the edges."""
    start, end, ws = piece
    return (0.0 if start is None else start, words_by_name[ws[-1]][2] if end is None else end)


# ---------------------------------------------------------------------------------------------
# segmentation


def test_short_utterance_is_not_cut():
    words = _continuous(20)  # ends at 0.1 + 20*0.4 - 0.1 = 8.0 s
    assert segment_words(words, 15.0, 0.4) == [(None, None, [w for w, _, _ in words])]


def test_long_utterance_cut_at_pauses_first():
    # 30 words (~12 s), a 1 s pause, 30 more: two pieces cut in the middle of the pause
    words = _continuous(60, pauses={30: 1.0})
    pieces = segment_words(words, 15.0, 0.4)
    assert [p[2] for p in pieces] == [[f"W{i}" for i in range(30)], [f"W{i}" for i in range(30, 60)]]
    pause_mid = (words[29][2] + words[30][1]) / 2
    assert pieces[0][0] is None and pieces[1][1] is None
    assert pieces[0][1] == pytest.approx(pause_mid, abs=1e-3) == pieces[1][0]


def test_long_utterance_without_pauses_cut_at_word_boundaries_within_limit():
    # 100 words of continuous speech (~40 s, no pause > 0.4 s), one slightly longer gap at word 37
    words = _continuous(100, pauses={37: 0.2})
    by_name = {w: (w, s, e) for w, s, e in words}
    pieces = segment_words(words, 15.0, 0.4)
    assert len(pieces) >= 3
    assert [w for p in pieces for w in p[2]] == [w for w, _, _ in words]  # every word once, in order
    for piece in pieces:
        start, end = _span(piece, by_name)
        assert end - start <= 15.0
        first, last = by_name[piece[2][0]], by_name[piece[2][-1]]
        assert start <= first[1] and last[2] <= end  # boundaries never cut through a word
    assert any(p[2][0] == "W37" for p in pieces)  # the longest gap is the first length cut
    # consecutive pieces share their boundary
    for a, b in zip(pieces, pieces[1:]):
        assert a[1] == b[0]


def test_segmentation_honours_a_smaller_limit():
    words = _continuous(50)  # 20 s
    by_name = {w: (w, s, e) for w, s, e in words}
    pieces = segment_words(words, 4.0, 0.4)
    assert all(_span(p, by_name)[1] - _span(p, by_name)[0] <= 4.0 for p in pieces)
    assert len(pieces) >= 5


def test_word_table_parsing(tmp_path):
    words = [("HELLO", 0.1, 0.5), ("THERE", 0.6, 1.0)]
    txt = _touch(tmp_path / "a.txt", _lrs3_txt(words))
    assert read_word_table(txt) == words
    assert read_transcript(txt) == "HELLO THERE"
    bad = _touch(tmp_path / "b.txt", "Text:  HI\n\nWORD START END ASDSCORE\nHI zero 1.0 3\n")
    with pytest.raises(ValueError, match="b.txt:4"):
        read_word_table(bad)


# ---------------------------------------------------------------------------------------------
# LRS3


@pytest.fixture
def lrs3_tree(tmp_path):
    root = tmp_path / "lrs3"
    long_words = _continuous(80, pauses={40: 1.0})  # ~33 s: split at the pause, then by length
    short_words = _continuous(10)
    _touch(root / "pretrain/spkA/00001.mp4")
    _touch(root / "pretrain/spkA/00001.txt", _lrs3_txt(long_words))
    _touch(root / "pretrain/spkB/00002.mp4")
    _touch(root / "pretrain/spkB/00002.txt", _lrs3_txt(short_words))
    for spk, utt in [("spkA", "50001"), ("spkA", "50002"), ("spkB", "50001"), ("spkC", "50003")]:
        _touch(root / f"trainval/{spk}/{utt}.mp4")
        _touch(root / f"trainval/{spk}/{utt}.txt", f"Text:  HELLO {spk} {utt}\nConf:  3\n")
    _touch(root / "test/spkD/00001.mp4")
    _touch(root / "test/spkD/00001.txt", "Text:  THE TEST ONE\nConf:  3\n")
    _touch(root / "valid.id", "trainval/spkA/50002\n# a comment\n\n")
    return root, long_words


def test_lrs3_items_ids_text_and_splits(lrs3_tree):
    root, long_words = lrs3_tree
    items = list_items(_cfg(root, "lrs3", valid_ids="valid.id"))
    ids = [i.id for i in items]
    segs = [i for i in items if i.id.startswith("pretrain/spkA/00001_")]
    assert len(segs) >= 3
    assert [i.id for i in segs] == [f"pretrain/spkA/00001_{k}" for k in range(len(segs))]
    assert " ".join(i.text for i in segs) == " ".join(w for w, _, _ in long_words)
    assert segs[0].start is None and segs[-1].end is None
    for a, b in zip(segs, segs[1:]):
        assert a.end == b.start and a.end is not None
    for s in segs:
        start = s.start or 0.0
        end = s.end if s.end is not None else long_words[-1][2]
        assert end - start <= 15.0
        assert s.video == str((root / "pretrain/spkA/00001.mp4").resolve())
    assert "pretrain/spkB/00002" in ids  # short: whole, no suffix
    assert all(Path(i.video).is_absolute() for i in items)
    split = {i.id: i.split for i in items}
    assert split["trainval/spkA/50002"] == "valid"
    assert split["test/spkD/00001"] == "test"
    assert Counter(split.values()) == {"train": len(items) - 2, "valid": 1, "test": 1}
    assert {i.id: i.text for i in items}["trainval/spkC/50003"] == "HELLO spkC 50003"
    assert list_items(_cfg(root, "lrs3", valid_ids="valid.id")) == items  # deterministic


def test_lrs3_valid_list_of_a_pretrain_utterance_takes_all_its_segments(lrs3_tree):
    root, _ = lrs3_tree
    _touch(root / "v2.id", "pretrain/spkA/00001\n")
    items = list_items(_cfg(root, "lrs3", valid_ids=str(root / "v2.id")))
    assert {i.id for i in items if i.split == "valid"} == {i.id for i in items if i.id.startswith("pretrain/spkA/00001_")}


def test_lrs3_seeded_valid_comes_from_trainval(lrs3_tree):
    root, _ = lrs3_tree
    items = list_items(_cfg(root, "lrs3", valid_fraction=0.5, split_seed=3))
    valid = {i.id for i in items if i.split == "valid"}
    trainval = {i.id for i in items if i.id.startswith("trainval/")}
    expected = _drawn(trainval, 3, 0.0, 0.5) or {min(trainval, key=lambda g: split_draw(3, g))}
    assert valid == expected and valid <= trainval
    assert list_items(_cfg(root, "lrs3", valid_fraction=0.5, split_seed=3)) == items
    seeds = {tuple(i.id for i in list_items(_cfg(root, "lrs3", valid_fraction=0.5, split_seed=s)) if i.split == "valid")
             for s in range(8)}
    assert len(seeds) > 1  # the seed matters


def test_lrs3_max_segment_seconds_setting(lrs3_tree):
    root, _ = lrs3_tree
    short = list_items(_cfg(root, "lrs3", max_segment_seconds=5.0))
    default = list_items(_cfg(root, "lrs3"))
    n = lambda items: sum(i.id.startswith("pretrain/spkA/00001_") for i in items)  # noqa: E731
    assert n(short) > n(default)


def test_lrs3_needs_its_dirs(tmp_path):
    _touch(tmp_path / "c/x.mp4")
    with pytest.raises(ConfigError, match="pretrain/, trainval/, test/"):
        list_items(_cfg(tmp_path / "c", "lrs3"))


# ---------------------------------------------------------------------------------------------
# VoxCeleb2


@pytest.mark.parametrize("mp4_level", [False, True])
def test_vox2_layout(tmp_path, mp4_level):
    root = tmp_path / "vox2"
    sub = "mp4/" if mp4_level else ""
    for spk in ("id001", "id002", "id003"):
        for clip in ("clipA", "clipB"):
            for utt in ("00001", "00002"):
                _touch(root / f"dev/{sub}{spk}/{clip}/{utt}.mp4")
    _touch(root / f"test/{sub}id900/clipZ/00001.mp4")
    _touch(root / "dev/readme.txt")
    items = list_items(_cfg(root, "vox2", valid_fraction=0.25, split_seed=1))
    assert len(items) == 13
    assert items[0].id == "dev/id001/clipA/00001"
    assert all(i.text is None for i in items)
    assert {i.id: i.split for i in items}["test/id900/clipZ/00001"] == "test"
    dev = {i.id for i in items if i.id.startswith("dev/")}
    assert {i.id for i in items if i.split == "valid"} == _drawn(dev, 1, 0.0, 0.25)
    assert Counter(i.split for i in items)["test"] == 1
    assert all(Path(i.video).is_file() for i in items)


# ---------------------------------------------------------------------------------------------
# plain


@pytest.fixture
def plain_tree(tmp_path):
    root = tmp_path / "plain"
    for name in ["a.mp4", "b.AVI", "sub/c.mov", "sub/deeper/d.mkv", "e.webm", "f.mp4", "g.mp4", "h.mp4",
                 "i.mp4", "j.mp4"]:
        _touch(root / name)
    _touch(root / "a.txt", "hello   world\nagain\n")  # whole text
    _touch(root / "sub/c.txt", "Text:  THE WORDS\nConf: 4\n")  # LRS3-like
    _touch(root / "notes.txt", "not a transcript of anything")
    _touch(root / ".hidden/x.mp4")
    _touch(root / "k.wav")
    return root


def test_plain_enumeration_and_transcripts(plain_tree):
    items = list_items(_cfg(plain_tree, "plain", valid_fraction=0, test_fraction=0))
    assert [i.id for i in items] == ["a", "b", "e", "f", "g", "h", "i", "j", "sub/c", "sub/deeper/d"]
    text = {i.id: i.text for i in items}
    assert text["a"] == "hello world again"
    assert text["sub/c"] == "THE WORDS"
    assert text["b"] is None and text["sub/deeper/d"] is None
    assert all(i.split == "train" and i.start is None and i.end is None for i in items)
    assert {i.id: i.video for i in items}["b"] == str((plain_tree / "b.AVI").resolve())


def test_plain_id_lists(plain_tree):
    _touch(plain_tree / "lists/valid.lst", "a\nsub/c\n")
    _touch(plain_tree / "lists/test.lst", "sub/deeper/d\n")
    items = list_items(_cfg(plain_tree, "plain", valid_ids="lists/valid.lst", test_ids="lists/test.lst"))
    split = {i.id: i.split for i in items}
    assert sorted(k for k, v in split.items() if v == "valid") == ["a", "sub/c"]
    assert [k for k, v in split.items() if v == "test"] == ["sub/deeper/d"]


def test_plain_valid_list_with_seeded_test(plain_tree):
    _touch(plain_tree / "v.lst", "a\n")
    items = list_items(_cfg(plain_tree, "plain", valid_ids="v.lst", test_fraction=0.2, split_seed=5))
    split = {i.id: i.split for i in items}
    assert split["a"] == "valid" and Counter(split.values())["valid"] == 1
    others = set(split) - {"a"}
    # with the valid ids listed, the test draw takes the bottom of the range
    assert {i for i, s in split.items() if s == "test"} == _drawn(others, 5, 0.0, 0.2)


def test_plain_seeded_fractions_are_deterministic(plain_tree):
    cfg = _cfg(plain_tree, "plain", valid_fraction=0.2, test_fraction=0.1, split_seed=7)
    first = list_items(cfg)
    ids = {i.id for i in first}
    split = {i.id: i.split for i in first}
    valid = _drawn(ids, 7, 0.0, 0.2) or {min(ids, key=lambda g: split_draw(7, g))}
    assert {i for i, s in split.items() if s == "valid"} == valid
    test = _drawn(ids, 7, 0.2, 0.3) or {min(ids - valid, key=lambda g: split_draw(7, g))}
    assert {i for i, s in split.items() if s == "test"} == test
    assert list_items(cfg) == first
    # a tiny positive fraction still gives one video
    tiny = list_items(_cfg(plain_tree, "plain", valid_fraction=0.01, test_fraction=0.01))
    assert Counter(i.split for i in tiny) == {"train": 8, "valid": 1, "test": 1}


def test_seeded_fractions_on_a_large_corpus_are_close_and_stable(tmp_path):
    """The per-video rule: about the fraction asked for, and adding videos never moves one."""
    root = tmp_path / "big"
    for k in range(1500):
        _touch(root / f"dev/id{k % 50:03d}/clip{k:04d}/00001.mp4")
    before = {i.id: i.split for i in list_items(_cfg(root, "vox2", valid_fraction=0.1, split_seed=2))}
    n_valid = Counter(before.values())["valid"]
    assert 110 <= n_valid <= 190  # 150 expected; binomial sd ~12
    for k in range(1500, 2000):
        _touch(root / f"dev/id{k % 50:03d}/clip{k:04d}/00001.mp4")
    after = {i.id: i.split for i in list_items(_cfg(root, "vox2", valid_fraction=0.1, split_seed=2))}
    assert len(after) == 2000 and all(after[i] == s for i, s in before.items())


def test_plain_fractions_too_big_for_the_corpus(tmp_path):
    _touch(tmp_path / "p/a.mp4")
    _touch(tmp_path / "p/b.mp4")
    with pytest.raises(ConfigError, match="test_fraction"):
        list_items(_cfg(tmp_path / "p", "plain", valid_fraction=0.3, test_fraction=0.3))


def test_id_list_errors(plain_tree, caplog):
    with pytest.raises(ConfigError, match="manifest.valid_ids: id list nope.lst not found"):
        list_items(_cfg(plain_tree, "plain", valid_ids="nope.lst"))
    _touch(plain_tree / "wrong.lst", "x/y\nz\n")
    with pytest.raises(ConfigError, match="none of the 2 ids"):
        list_items(_cfg(plain_tree, "plain", valid_ids="wrong.lst"))
    _touch(plain_tree / "v.lst", "a\nb\n")
    _touch(plain_tree / "t.lst", "b\n")
    with pytest.raises(ConfigError, match="share 1 ids"):
        list_items(_cfg(plain_tree, "plain", valid_ids="v.lst", test_ids="t.lst"))
    _touch(plain_tree / "partial.lst", "a\nmissing_one\n")
    with caplog.at_level(logging.WARNING):
        items = list_items(_cfg(plain_tree, "plain", valid_ids="partial.lst"))
    assert "1 of 2 ids" in caplog.text
    assert [i.id for i in items if i.split == "valid"] == ["a"]


def test_include_ids(plain_tree):
    _touch(plain_tree / "keep.lst", "a\nb\nsub/c\n")
    items = list_items(_cfg(plain_tree, "plain", include_ids="keep.lst", valid_fraction=0, test_fraction=0))
    assert [i.id for i in items] == ["a", "b", "sub/c"]


def test_duplicate_ids_are_one_failed_item_and_the_rest_proceeds(tmp_path):
    _touch(tmp_path / "p/a.mp4")
    _touch(tmp_path / "p/a.mkv")
    _touch(tmp_path / "p/b.mp4")
    items = list_items(_cfg(tmp_path / "p", "plain", valid_fraction=0, test_fraction=0))
    assert [i.id for i in items] == ["a", "b"]
    a, b = items
    assert b.error is None
    assert "2 videos give the id 'a' (a.mp4, a.mkv)" in a.error and a.video.endswith("a.mp4")


def test_bad_corpus_settings(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        list_items(_cfg(tmp_path / "absent", "plain"))
    with pytest.raises(ConfigError, match="unknown layout"):
        list_items(_cfg(tmp_path, "lrs2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no videos found"):
        list_items(_cfg(tmp_path / "empty", "plain"))
    with pytest.raises(ConfigError, match="no corpus directory"):
        list_items(OmegaConf.create({"layout": "plain"}))
