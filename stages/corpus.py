"""Corpus layouts: which items (videos or segments of videos) a corpus holds, their split and text.

Interface used by the crop and manifest stages: ``list_items(cfg) -> list[Item]``, reading the
top-level ``cfg.corpus`` (a directory) and ``cfg.layout`` (``plain`` | ``lrs3`` | ``vox2``) and the
split settings of the manifest section (``cfg.manifest``, see ``stages.manifest.Config``).

Layouts (ids are paths relative to the corpus dir, without extension; they may contain ``/``):

- ``lrs3``: ``pretrain/``, ``trainval/``, ``test/``, each ``<spk>/<utt>.mp4`` + ``<utt>.txt``
  (first line ``Text:  WORDS``; pretrain files also carry a ``WORD START END ASDSCORE`` table).
  A pretrain utterance whose words run past ``max_segment_seconds`` (15 s, as the reference LRS3
  preparation) is cut at word boundaries: first at pauses longer than ``min_pause_seconds`` (0.4 s,
  as the reference), then, while a piece is still too long, at its longest inter-word gap. A cut
  lies halfway through the gap; the first piece starts at 0 and the last runs to the end of the
  video (as the reference). Segment ids get ``_<k>`` (``pretrain/<spk>/<utt>_<k>``, k from 0).
  trainval and test utterances stay whole. test/ is the test split; valid is the ids of
  ``valid_ids`` (the reference uses a held-out list of trainval ids) or, without a list, a seeded
  ``valid_fraction`` of the trainval utterances; everything else in pretrain + trainval is train.
- ``vox2``: ``dev/<spk>/<clip>/<utt>.mp4`` and ``test/...`` (an extra ``mp4/`` level below dev/
  and test/, as the official archives unpack, is accepted and left out of the ids). No
  transcripts. test/ is the test split; valid from ``valid_ids`` or a seeded fraction of dev.
- ``plain``: every video under the corpus dir (recursively; ``.mp4 .avi .mov .mkv .webm``, hidden
  dirs skipped), with an optional same-name ``.txt`` transcript (its ``Text:`` line if it has one,
  else its whole text). valid/test from ``valid_ids``/``test_ids`` or seeded
  ``valid_fraction``/``test_fraction``.

Id list files: one id per line (blank lines and ``#`` comments ignored); a relative path is looked
up in the corpus dir, then in the current dir. A listed id also matches every segment of that
utterance. Seeded fractions draw whole source videos (segments of one video never straddle two
splits), ``round(fraction * n)`` of them but at least one when the fraction is positive. An
optional ``include_ids`` list restricts the corpus (e.g. the English subset of VoxCeleb2).

The order is deterministic: sorted paths, segments in time order.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

LAYOUTS = ("plain", "lrs3", "vox2")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class Item:
    id: str  # unique; may contain '/', e.g. "spk01/00001" (LRS3) or "clip_003" (plain)
    video: str  # absolute path of the source video
    start: Optional[float] = None  # seconds into the video; None = from the beginning
    end: Optional[float] = None  # seconds; None = to the end
    split: str = "train"  # train | valid | test
    text: Optional[str] = None  # transcript words, or None when the corpus has none


@dataclass(frozen=True)
class _Entry:
    """An item before split assignment: ``group`` is the id of its source video (the unit a list
    id or a seeded draw selects), ``part`` the layout's own division (pretrain, trainval, test,
    dev, or "" for plain)."""

    item: Item
    group: str
    part: str


def list_items(cfg) -> list[Item]:
    """All items of the configured corpus with their split, in a deterministic order."""
    corpus = _get(cfg, "corpus")
    layout = _get(cfg, "layout") or "plain"
    if not corpus:
        raise ConfigError("corpus: no corpus directory given (set corpus=/path/to/videos)")
    root = Path(str(corpus)).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"corpus: {root} is not a directory")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: unknown layout '{layout}' (one of {', '.join(LAYOUTS)})")
    settings = manifest_settings(cfg)

    if layout == "lrs3":
        entries = _lrs3_entries(root, float(settings.max_segment_seconds), float(settings.min_pause_seconds))
    elif layout == "vox2":
        entries = _vox2_entries(root)
    else:
        entries = _plain_entries(root)
    if not entries:
        raise ConfigError(f"corpus: no videos found in {root} for layout '{layout}'")
    _check_unique(entries)

    if settings.include_ids:
        keep = _read_id_list(settings.include_ids, root, "manifest.include_ids")
        entries = _matching(entries, keep, "manifest.include_ids", settings.include_ids)
    return _assign_splits(entries, layout, root, settings)


def manifest_settings(cfg):
    """``cfg.manifest`` over the manifest stage's typed defaults (a DictConfig), so callers that
    build a partial config still get every setting."""
    from omegaconf import OmegaConf

    from stages.manifest import Config

    section = _get(cfg, "manifest")
    base = OmegaConf.structured(Config)
    if section is None:
        return base
    return OmegaConf.merge(base, section)


def _get(cfg, key):
    if isinstance(cfg, dict):
        return cfg.get(key)
    try:
        return cfg.get(key)  # DictConfig
    except AttributeError:
        return getattr(cfg, key, None)


# ---------------------------------------------------------------------------------------------
# transcripts


def read_transcript(path: Path) -> Optional[str]:
    """Words of a transcript file: the ``Text:`` line if there is one, else the whole text;
    whitespace collapsed; None when empty."""
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("Text:"):
            words = line[len("Text:"):].split()
            return " ".join(words) or None
    words = text.split()
    return " ".join(words) or None


def read_word_table(path: Path) -> list[tuple[str, float, float]]:
    """The ``WORD START END [ASDSCORE]`` table of an LRS3 transcript, [] when it has none."""
    words = []
    in_table = False
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split()
        if not in_table:
            in_table = bool(fields) and fields[0] == "WORD"
            continue
        if not fields:
            continue
        if len(fields) < 3:
            raise ValueError(f"{path}:{n}: expected 'WORD START END [SCORE]', got {line!r}")
        try:
            words.append((fields[0], float(fields[1]), float(fields[2])))
        except ValueError:
            raise ValueError(f"{path}:{n}: bad time in {line!r}") from None
    return words


# ---------------------------------------------------------------------------------------------
# LRS3 pretrain segmentation


def segment_words(
    words: Sequence[tuple[str, float, float]], max_seconds: float, min_pause: float
) -> list[tuple[Optional[float], Optional[float], list[str]]]:
    """Cut a word-timed utterance into ``(start, end, words)`` pieces (None = video start/end).

    Nothing is cut when the last word ends by ``max_seconds``. Otherwise cut at every pause longer
    than ``min_pause``, then split any piece still longer than ``max_seconds`` (measured from its
    start boundary, or 0, to its end boundary, or its last word's end) at its longest inter-word
    gap, ties to the gap nearest its middle. A single word longer than the limit stays whole.
    """
    n = len(words)
    if n == 0 or words[-1][2] <= max_seconds:
        return [(None, None, [w for w, _, _ in words])]

    def cut_time(k: int) -> float:  # cut between word k-1 and word k
        return (words[k - 1][2] + words[k][1]) / 2

    def bounds(a: int, b: int) -> tuple[float, float]:
        start = 0.0 if a == 0 else cut_time(a)
        end = words[-1][2] if b == n else cut_time(b)
        return start, end

    cuts = [k for k in range(1, n) if words[k][1] - words[k - 1][2] > min_pause]
    pieces = list(zip([0] + cuts, cuts + [n]))
    done = []
    while pieces:
        a, b = pieces.pop(0)
        start, end = bounds(a, b)
        if end - start <= max_seconds or b - a == 1:
            if b - a == 1 and end - start > max_seconds:
                log.warning("a single word lasts %.1f s (> %.1f s); kept whole", end - start, max_seconds)
            done.append((a, b))
            continue
        middle = (start + end) / 2
        k = max(range(a + 1, b), key=lambda k: (words[k][1] - words[k - 1][2], -abs(cut_time(k) - middle)))
        pieces[:0] = [(a, k), (k, b)]
    done.sort()
    out = []
    for a, b in done:
        start = None if a == 0 else round(cut_time(a), 3)
        end = None if b == n else round(cut_time(b), 3)
        out.append((start, end, [w for w, _, _ in words[a:b]]))
    return out


# ---------------------------------------------------------------------------------------------
# layouts


def _videos_in(directory: Path, depth: int) -> list[Path]:
    """``*.mp4`` exactly ``depth`` directory levels below ``directory``, sorted."""
    pattern = "/".join(["*"] * depth + ["*.mp4"])
    return sorted(p for p in directory.glob(pattern) if p.is_file())


def _lrs3_entries(root: Path, max_seconds: float, min_pause: float) -> list[_Entry]:
    parts = [p for p in ("pretrain", "trainval", "test") if (root / p).is_dir()]
    if not parts:
        raise ConfigError(f"corpus: {root} has none of pretrain/, trainval/, test/ (layout lrs3)")
    entries = []
    for part in parts:
        for video in _videos_in(root / part, 1):
            group = video.relative_to(root).with_suffix("").as_posix()
            txt = video.with_suffix(".txt")
            text = None
            if txt.is_file():
                text = read_transcript(txt)
            else:
                log.warning("%s: no transcript %s", video, txt.name)
            if part == "pretrain" and txt.is_file():
                try:
                    table = read_word_table(txt)
                except ValueError as e:
                    log.warning("%s; utterance kept whole", e)
                    table = []
                pieces = segment_words(table, max_seconds, min_pause) if table else [(None, None, None)]
            else:
                pieces = [(None, None, None)]
            if len(pieces) == 1:
                entries.append(_Entry(Item(group, str(video), text=text), group, part))
                continue
            for k, (start, end, seg_words) in enumerate(pieces):
                item = Item(f"{group}_{k}", str(video), start, end, text=" ".join(seg_words) or None)
                entries.append(_Entry(item, group, part))
    return entries


def _vox2_entries(root: Path) -> list[_Entry]:
    parts = [p for p in ("dev", "test") if (root / p).is_dir()]
    if not parts:
        raise ConfigError(f"corpus: {root} has neither dev/ nor test/ (layout vox2)")
    entries = []
    for part in parts:
        base = root / part / "mp4" if (root / part / "mp4").is_dir() else root / part
        for video in _videos_in(base, 2):
            group = f"{part}/{video.relative_to(base).with_suffix('').as_posix()}"
            entries.append(_Entry(Item(group, str(video)), group, part))
    return entries


def _plain_entries(root: Path) -> list[_Entry]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            item_id = path.relative_to(root).with_suffix("").as_posix()
            txt = path.with_suffix(".txt")
            text = read_transcript(txt) if txt.is_file() else None
            entries.append(_Entry(Item(item_id, str(path), text=text), item_id, ""))
    entries.sort(key=lambda e: e.item.id)
    return entries


def _check_unique(entries: list[_Entry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        if any(c in e.item.id for c in "\t\n\r"):
            raise ConfigError(f"corpus: {e.item.video}: a tab or newline in a file name cannot go in a manifest")
        if e.item.id in seen:
            raise ConfigError(
                f"corpus: two videos give the same id '{e.item.id}': {seen[e.item.id]} and {e.item.video}"
            )
        seen[e.item.id] = e.item.video


# ---------------------------------------------------------------------------------------------
# splits


def _read_id_list(setting: str, root: Path, name: str) -> set[str]:
    path = Path(str(setting)).expanduser()
    candidates = [path] if path.is_absolute() else [root / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            ids = set()
            for line in candidate.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(line)
            return ids
    raise ConfigError(f"{name}: id list {setting} not found (looked for {', '.join(map(str, candidates))})")


def _matching(entries: Iterable[_Entry], ids: set[str], name: str, setting: str) -> list[_Entry]:
    entries = list(entries)
    hits = [e for e in entries if e.item.id in ids or e.group in ids]
    known = {e.item.id for e in entries} | {e.group for e in entries}
    missing = sorted(ids - known)
    if ids and not hits:
        raise ConfigError(
            f"{name}: none of the {len(ids)} ids in {setting} is in the corpus "
            f"(e.g. '{missing[0]}'; corpus ids look like '{entries[0].item.id}')"
        )
    if missing:
        log.warning("%s: %d of %d ids in %s are not in the corpus (e.g. %s)", name, len(missing), len(ids),
                    setting, ", ".join(missing[:3]))
    return hits


def _draw(groups: list[str], fraction: float, rng: random.Random) -> list[str]:
    if fraction <= 0 or not groups:
        return []
    n = max(1, round(fraction * len(groups)))
    return rng.sample(groups, n)


def _assign_splits(entries: list[_Entry], layout: str, root: Path, settings) -> list[Item]:
    split_of_group: dict[str, str] = {}
    test_parts = {"test"} if layout in ("lrs3", "vox2") else set()
    for e in entries:
        split_of_group[e.group] = "test" if e.part in test_parts else "train"

    rng = random.Random(int(settings.split_seed))
    listed: dict[str, set[str]] = {}
    for split in ("valid", "test"):
        setting = settings.get(f"{split}_ids")
        if setting:
            hits = _matching(entries, _read_id_list(setting, root, f"manifest.{split}_ids"),
                             f"manifest.{split}_ids", setting)
            listed[split] = {e.group for e in hits}
    if "valid" in listed and "test" in listed and listed["valid"] & listed["test"]:
        both = sorted(listed["valid"] & listed["test"])
        raise ConfigError(
            f"manifest.valid_ids and manifest.test_ids share {len(both)} ids (e.g. '{both[0]}')"
        )
    for split, groups in listed.items():
        for g in groups:
            split_of_group[g] = split

    # seeded draws, from the groups still in train (lrs3: trainval only, as the reference)
    def pool() -> list[str]:
        parts = {"trainval"} if layout == "lrs3" else {"dev", ""}
        return sorted({e.group for e in entries if e.part in parts and split_of_group[e.group] == "train"})

    draws = []
    if "valid" not in listed:
        draws.append(("valid", float(settings.valid_fraction)))
    if layout == "plain" and "test" not in listed:
        draws.append(("test", float(settings.test_fraction)))
    for split, fraction in draws:
        candidates = pool()
        chosen = _draw(candidates, fraction, rng)
        if chosen and len(chosen) >= len(candidates):
            raise ConfigError(
                f"manifest.{split}_fraction={fraction}: the corpus has only {len(candidates)} candidate videos "
                f"left for train/{split}; give id lists or lower the fractions"
            )
        for g in chosen:
            split_of_group[g] = split

    return [replace(e.item, split=split_of_group[e.group]) for e in entries]
