"""The crop stage's frozen item list: the corpus as first listed, plus every batch of items added
by a later listing, in ``WORKDIR/crop/items/``.

- ``batch-NNNNN.jsonl``: one JSON object per item (``id``, ``path`` relative to the corpus dir,
  ``split``, ``size``/``mtime_ns`` of the source when listed, and when set ``group``, ``part``,
  ``start``, ``end``, ``text``, ``error``). Written once, atomically, never changed.
- ``index.json`` (small; the only file ``shards()`` reads): the corpus dir and layout it was
  listed from, and per batch its file, item count, byte size and shard boundaries as
  ``[byte offset, item count]`` pairs. Shard ``k`` (key ``%05d``) is the ``k``-th pair counting
  over all batches, so a shard reads only its own slice (one seek + one read: start-up cost
  independent of the corpus) and shards already frozen never change meaning.
- ``listing.json`` + ``removed.txt`` / ``changed.txt`` / ``ignored.tsv``: what the last listing
  found against the frozen list (counts; the ids of items whose source is gone or differs, read
  by the manifest for ``manifest.drop_removed``) and every path under the corpus dir that is not
  an item, with the reason (``kind<TAB>path``; counted and sampled in listing.json, shown by
  ``launch.py status`` and the run report).

Memory: a later launch holds ``{id: fingerprint}`` of the frozen items and the new listing at
once (about 0.5 KB per item: ~0.6 GB at 1.1M items, see bench/scale.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from pipeline import atomic
from stages.corpus import Item, shown

FORMAT = 1
INDEX = "index.json"


@dataclass
class Batch:
    file: str
    items: int
    bytes: int
    first_shard: int
    shards: list  # [[byte offset, item count], ...]


@dataclass
class Index:
    corpus: str
    layout: str
    batches: list = field(default_factory=list)  # list[Batch]

    @property
    def n_items(self) -> int:
        return sum(b.items for b in self.batches)

    @property
    def n_shards(self) -> int:
        return sum(len(b.shards) for b in self.batches)

    def slices(self) -> Iterator[tuple[int, Batch, int, int, int]]:
        """(shard number, batch, byte offset, byte length, item count) of every shard."""
        for b in self.batches:
            for k, (offset, count) in enumerate(b.shards):
                stop = b.shards[k + 1][0] if k + 1 < len(b.shards) else b.bytes
                yield b.first_shard + k, b, offset, stop - offset, count

    def to_json(self) -> dict:
        return {"format": FORMAT, "corpus": self.corpus, "layout": self.layout,
                "batches": [vars(b) for b in self.batches]}


def read_index(items_dir: Path) -> Optional[Index]:
    path = Path(items_dir) / INDEX
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: item list format {data.get('format')!r}, this code reads {FORMAT}")
    return Index(data["corpus"], data["layout"], [Batch(**b) for b in data["batches"]])


# ---------------------------------------------------------------------------------------------
# records


def relative_source(video: str, root: Path) -> str:
    """The source path relative to the corpus dir; absolute when it is not under it (items made
    by hand, tests). A string prefix, not os.path.relpath: this runs for every listed item."""
    prefix = str(root).rstrip("/") + "/"
    return video[len(prefix):] if video.startswith(prefix) else video


def item_record(item: Item, root: Path) -> dict:
    rel = relative_source(item.video, root)
    rec = {"id": item.id, "path": rel, "split": item.split, "size": item.size, "mtime_ns": item.mtime_ns}
    if item.group and item.group != item.id:
        rec["group"] = item.group
    if item.part:
        rec["part"] = item.part
    for key in ("start", "end", "text", "error"):
        value = getattr(item, key)
        if value is not None:
            rec[key] = float(value) if key in ("start", "end") else value
    return rec


def record_item(rec: dict, root: Path) -> Item:
    return Item(rec["id"], os.path.join(str(root), rec["path"]), rec.get("start"), rec.get("end"),
                rec.get("split", "train"), rec.get("text"), rec.get("group", rec["id"]), rec.get("part", ""),
                rec.get("size"), rec.get("mtime_ns"), rec.get("error"))


_json_str = json.encoder.encode_basestring_ascii  # '"..."', \uXXXX escapes (surrogates too), in C


def _json_num(value) -> str:
    return "null" if value is None else repr(value)  # int, or float as json.dumps writes it


def record_line(item: Item, prefix: str) -> str:
    """``json.dumps(item_record(item, root))`` (same keys, same order), written by hand: a
    VoxCeleb2 plan writes 1.1M of them and json.dumps costs 5x more. ``prefix``: the corpus dir
    with a trailing slash."""
    video = item.video
    rel = video[len(prefix):] if video.startswith(prefix) else video
    parts = ['{"id":', _json_str(item.id), ',"path":', _json_str(rel), ',"split":', _json_str(item.split),
             ',"size":', _json_num(item.size), ',"mtime_ns":', _json_num(item.mtime_ns)]
    if item.group and item.group != item.id:
        parts += [',"group":', _json_str(item.group)]
    if item.part:
        parts += [',"part":', _json_str(item.part)]
    if item.start is not None:
        parts += [',"start":', repr(float(item.start))]
    if item.end is not None:
        parts += [',"end":', repr(float(item.end))]
    if item.text is not None:
        parts += [',"text":', _json_str(item.text)]
    if item.error is not None:
        parts += [',"error":', _json_str(item.error)]
    parts.append("}\n")
    return "".join(parts)


def encode_items(items: list, root: Path) -> tuple[bytes, list[int]]:
    """The JSON lines of ``items`` and the byte offset where each line starts."""
    prefix = str(root).rstrip("/") + "/"
    lines = [record_line(i, prefix) for i in items]
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)  # ASCII: characters are bytes
    return "".join(lines).encode("ascii"), offsets


def shard_bounds(n_items: int, items_per_shard: int, n_shards: int = 0) -> list[int]:
    n = int(n_shards) or math.ceil(n_items / int(items_per_shard))
    n = max(1, min(n, n_items))
    return [round(i * n_items / n) for i in range(n + 1)]


def new_batch(index: Index, items: list, root: Path, items_per_shard: int, n_shards: int = 0
              ) -> tuple[Batch, bytes]:
    """The next batch of ``index`` holding ``items`` (not written; see ``write_batch``)."""
    data, offsets = encode_items(items, root)
    bounds = shard_bounds(len(items), items_per_shard, n_shards)
    shards = [[offsets[a], b - a] for a, b in zip(bounds, bounds[1:])]
    batch = Batch(f"batch-{len(index.batches):05d}.jsonl", len(items), len(data), index.n_shards, shards)
    return batch, data


def write_batch(items_dir: Path, index: Index, batch: Batch, data: bytes) -> None:
    """The batch file, then the index naming it (a kill in between leaves an index without the
    batch: the next launch writes it again under the same name). ``index`` may list ``batch``
    already (the plan a launch made in memory)."""
    with atomic.atomic_open(Path(items_dir) / batch.file, "wb") as f:
        f.write(data)
    if not index.batches or index.batches[-1] is not batch:
        index.batches.append(batch)
    atomic.write_json(Path(items_dir) / INDEX, index.to_json())


def read_slice(items_dir: Path, batch_file: str, offset: int, length: int, count: int, root: Path) -> list[Item]:
    """The items of one shard: one seek and one read of its own bytes."""
    path = Path(items_dir) / batch_file
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    lines = data.splitlines()
    if len(lines) != count:
        raise ValueError(f"{path}: {len(lines)} items at byte {offset}, the index says {count}: the item list "
                         "was changed by hand")
    return [record_item(json.loads(line), root) for line in lines]


def iter_records(items_dir: Path, index: Index, chunk: int = 8192) -> Iterator[dict]:
    """Every frozen record, batch by batch, streamed ``chunk`` lines at a time (each chunk parsed
    by one ``json.loads`` of a JSON array: a third of the cost of one call per line)."""
    for b in index.batches:
        with open(Path(items_dir) / b.file, encoding="ascii") as f:
            while True:
                lines = [line for _, line in zip(range(chunk), f)]
                if not lines:
                    break
                yield from json.loads("[" + ",".join(lines) + "]")


def read_json_lines(path: Path) -> list:
    """The records of a JSON-lines file (the item list's batches, the crop results): one
    ``json.loads`` of the whole file as an array (3x faster than a call per line at 1.1M
    records); a line that is not JSON is a ValueError naming the file and line."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        for n, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
        raise


# ---------------------------------------------------------------------------------------------
# comparing a new listing with the frozen list


@dataclass
class Changes:
    new: list = field(default_factory=list)  # Items to append (new ids, and ids planned again)
    replanned: int = 0  # of ``new``: frozen with an error that is gone now
    removed: list = field(default_factory=list)  # frozen ids no longer listed
    changed: list = field(default_factory=list)  # (id, what) of frozen ids whose source differs
    frozen: int = 0

    def lines(self, limit: int = 3) -> list[str]:
        out = []
        if self.removed:
            out.append(f"{len(self.removed)} frozen items are gone from the corpus (e.g. "
                       + ", ".join(self.removed[:limit]) + "); their crops stay in the manifest unless "
                       "manifest.drop_removed=true")
        if self.changed:
            out.append(f"{len(self.changed)} frozen items changed since they were listed (e.g. "
                       + "; ".join(f"{i}: {w}" for i, w in self.changed[:limit]) + "); their crops are from "
                       "the files as they were; manifest.drop_removed=true leaves them out")
        return out


def compare(items_dir: Path, index: Index, items: list, root: Path) -> Changes:
    """What the current listing (``items``) adds to, removes from or changes in the frozen list."""
    frozen: dict[str, tuple] = {}
    for rec in iter_records(items_dir, index):
        # a later record of an id (planned again) replaces the earlier one
        get = rec.get
        frozen[rec["id"]] = ((rec["path"], get("size"), get("mtime_ns"), get("start"), get("end"), get("text")),
                             "error" in rec)
    ch = Changes(frozen=len(frozen))
    prefix = str(root).rstrip("/") + "/"
    listed = set()
    for item in items:
        listed.add(item.id)
        old = frozen.get(item.id)
        if old is None:
            ch.new.append(item)
            continue
        (path, size, mtime_ns, start, end, text), had_error = old
        if had_error:
            if item.error is None:
                ch.new.append(item)
                ch.replanned += 1
            continue
        if item.error is not None:
            ch.changed.append((item.id, item.error))
            continue
        video = item.video
        rel = video[len(prefix):] if video.startswith(prefix) else video
        if rel != path:
            ch.changed.append((item.id, f"now {shown(rel)}, was {shown(path)}"))
        elif (item.size, item.mtime_ns) != (size, mtime_ns):
            ch.changed.append((item.id, f"{shown(rel)} was modified (size {size} -> {item.size})"))
        elif (item.start, item.end) != (start, end):
            ch.changed.append((item.id, f"segment now {item.start}-{item.end} s, was {start}-{end} s"))
        elif item.text != text:
            ch.changed.append((item.id, "transcript changed"))
    ch.removed = sorted(i for i in frozen if i not in listed)
    ch.changed.sort()
    return ch


LISTING_EXAMPLES = 5  # ids/messages kept per kind in listing.json (counts are complete)


def write_listing_report(items_dir: Path, listed: int, changes: Changes, problems: Optional[dict] = None,
                         ignored: Optional[dict] = None) -> None:
    """What the last listing found (read by the crop summary, the manifest's drop_removed, status
    and the run report): counts, the first few removed/changed ids, the listing's per-item
    problems (``Listing.problems``: kind -> messages) and the paths under the corpus dir that are
    not items (``Listing.ignored``: kind -> paths) as a count and the first few per kind; the
    complete lists are ``removed.txt`` / ``changed.txt`` / ``ignored.tsv`` (``kind<TAB>path``),
    the problems' items are failure records of the crop stage."""
    ignored = ignored or {}
    atomic.write_text(Path(items_dir) / "removed.txt", "".join(i + "\n" for i in changes.removed))
    atomic.write_text(Path(items_dir) / "changed.txt", "".join(i + "\n" for i, _ in changes.changed))
    atomic.write_text(Path(items_dir) / "ignored.tsv",
                      "".join(f"{kind}\t{path}\n" for kind, paths in ignored.items() for path in paths))
    atomic.write_json(Path(items_dir) / "listing.json",
                      {"listed": listed, "frozen_before": changes.frozen, "new": len(changes.new),
                       "replanned": changes.replanned, "removed": len(changes.removed),
                       "changed": len(changes.changed),
                       "removed_examples": changes.removed[:LISTING_EXAMPLES],
                       "changed_examples": [list(c) for c in changes.changed[:LISTING_EXAMPLES]],
                       "problems": _counted(problems or {}),
                       "ignored_total": sum(len(p) for p in ignored.values()),
                       "ignored": _counted(ignored)})


def _counted(lists: dict) -> dict:
    return {kind: {"count": len(values), "examples": list(values[:LISTING_EXAMPLES])}
            for kind, values in sorted(lists.items())}


def read_listing_report(items_dir: Path) -> dict:
    try:
        return json.loads((Path(items_dir) / "listing.json").read_text())
    except FileNotFoundError:
        return {}


def listing_status_lines(items_dir: Path) -> list[str]:
    """``launch.py status``'s lines on the last listing: items listed, and the paths under the
    corpus dir that are not items (count per kind, first paths, where all of them are)."""
    try:
        listing = read_listing_report(items_dir)
    except ValueError as e:  # a malformed file: one line, never a traceback
        return [f"corpus listing: {Path(items_dir) / 'listing.json'} cannot be read ({e})"]
    if not listing:
        return []
    lines = [f"corpus listing: {listing.get('listed', 0)} items listed"]
    ignored = listing.get("ignored") or {}
    if ignored:
        lines[0] += (f", {listing.get('ignored_total', 0)} paths under the corpus dir are not items "
                     f"(all of them: {Path(items_dir) / 'ignored.tsv'})")
        for kind, entry in ignored.items():
            examples = entry.get("examples") or []
            count = int(entry.get("count") or 0)
            lines.append(f"    {count} {kind}: " + ", ".join(examples) + (" ..." if count > len(examples) else ""))
    for kind, entry in (listing.get("problems") or {}).items():
        lines.append(f"    {entry.get('count', 0)} {kind} (failure records of the crop stage)")
    return lines


def read_id_file(path: Path) -> set[str]:
    try:
        return set(Path(path).read_text().splitlines())
    except FileNotFoundError:
        return set()
