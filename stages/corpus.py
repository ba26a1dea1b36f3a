"""Corpus layouts: which items (videos or segments of videos) a corpus holds, their split and text.

``scan_corpus(cfg) -> Listing`` (and ``list_items(cfg) -> list[Item]``) reads the top-level
``cfg.corpus`` (a directory) and ``cfg.layout`` (``plain`` | ``lrs3`` | ``vox2``) and the corpus
settings (``CorpusSettings``; the keys live in the ``manifest`` section of the config, where
users have always set them). The crop stage lists the corpus once per launch and freezes the
result (``stages/item_list.py``); every later reader uses that frozen list, never the tree.

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
  files and dirs skipped, symlinked dirs not followed), with an optional same-name ``.txt``
  transcript (its ``Text:`` line if it has one, else its whole text). valid/test from
  ``valid_ids``/``test_ids`` or seeded ``valid_fraction``/``test_fraction``.

Listing cost: one ``os.scandir`` walk (no glob), one ``stat`` per video (its size and mtime are
frozen with the item, so a later launch can tell a changed source), each transcript read once
(in a process pool when there are many, LRS3's 150k word tables, and 4 CPUs or more).

Ids: the relative path decoded as the filesystem does (UTF-8, undecodable bytes kept as
surrogates), then ``%``, control characters and every undecodable byte percent-escaped
(``caf\\xe9.mp4`` -> ``caf%E9``, ``50%.mp4`` -> ``50%25``): ids, output file names and manifest
rows are always valid UTF-8 without tabs or newlines, and ``unescape_id`` gives the bytes back.
``Item.video`` keeps the source path exactly.

Per-item problems never refuse the corpus; the item carries ``error`` and the crop stage records
it as a failure: several videos giving one id (``a.mp4`` + ``a.mov``: one item with the error,
naming every file; none is cropped, since nothing says which one was meant), a transcript that is
not valid UTF-8 (named with the byte and its offset; its text is never guessed), a video that
cannot be stat'ed (a dangling link).

Splits. Id list files: one id per line (blank lines and ``#`` comments ignored); a relative path
is looked up in the corpus dir, then in the current dir. A listed id also matches every segment
of that utterance. Without a list, a seeded per-video rule: each source video of the draw pool
(lrs3: trainval, vox2: dev, plain: everything) gets ``u = hash(split_seed, video id)`` in [0, 1);
``u < valid_fraction`` is valid, then (plain, without ``test_ids``) the next ``test_fraction`` of
the range is test. A video's split depends on nothing else, so adding videos never moves one
(segments of one video never straddle two splits). When a positive fraction selects no video at
all (a corpus of a few videos), the pool video with the smallest ``u`` is taken, so valid is
never empty; that choice can move once the corpus grows enough for the rule to select one. An
optional ``include_ids`` list restricts the corpus (e.g. the English subset of VoxCeleb2).

The order is deterministic: the layout's parts in order, sorted paths, segments in time order.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import re
import stat
import time
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

from pipeline.errors import ConfigError
from pipeline.fingerprint import classify, file_content

log = logging.getLogger(__name__)

LAYOUTS = ("plain", "lrs3", "vox2")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
SPLITS = ("train", "valid", "test")
# transcripts parsed in a process pool above this many (below, starting the pool costs more)
PARALLEL_MIN_TRANSCRIPTS = 4000
PARALLEL_MIN_CPUS = 4


# which items there are (include_ids, LRS3 segmentation: the crop stage reads these) and their splits
@classify(output=("valid_ids", "test_ids", "include_ids", "valid_fraction", "test_fraction", "split_seed",
                  "max_segment_seconds", "min_pause_seconds"))
@dataclass
class CorpusSettings:
    """What decides the items and their splits. The keys are set in the ``manifest`` section
    (``manifest.valid_ids=...``); the manifest stage's Config extends this class."""

    valid_ids: Optional[str] = None  # id list file (relative: to the corpus dir, then the cwd)
    test_ids: Optional[str] = None
    include_ids: Optional[str] = None  # restrict the corpus to these ids (e.g. VoxCeleb2 English)
    valid_fraction: float = 0.05  # without valid_ids: share of source videos drawn for valid
    test_fraction: float = 0.05  # plain layout without test_ids (lrs3/vox2 have a test/ dir)
    split_seed: int = 0
    # LRS3 pretrain segmentation (reference: 15 s, pauses > 0.4 s)
    max_segment_seconds: float = 15.0
    min_pause_seconds: float = 0.4


CORPUS_KEYS = tuple(f.name for f in fields(CorpusSettings))


def corpus_settings(cfg) -> CorpusSettings:
    """The corpus keys of ``cfg.manifest`` over their defaults (a partial config is fine)."""
    section = _get(cfg, "manifest")
    values = {}
    for key in CORPUS_KEYS:
        value = _get(section, key) if section is not None else None
        if value is not None:
            values[key] = value
    s = CorpusSettings(**values)
    for key in ("valid_fraction", "test_fraction", "max_segment_seconds", "min_pause_seconds"):
        setattr(s, key, float(getattr(s, key)))
    s.split_seed = int(s.split_seed)
    return s


class Item(NamedTuple):
    """One item. A named tuple, not a dataclass: a VoxCeleb2 listing makes 1.1M of them."""

    id: str  # unique, escaped (see escape_id); may contain '/', e.g. "spk01/00001" or "clip_003"
    video: str  # absolute path of the source video (exactly as on disk)
    start: Optional[float] = None  # seconds into the video; None = from the beginning
    end: Optional[float] = None  # seconds; None = to the end
    split: str = "train"  # train | valid | test
    text: Optional[str] = None  # transcript words, or None when the corpus has none
    group: str = ""  # id of the source video (what an id list or the split rule selects)
    part: str = ""  # the layout's division: pretrain, trainval, test, dev, or "" (plain)
    size: Optional[int] = None  # bytes of the source video when listed
    mtime_ns: Optional[int] = None  # its modification time when listed
    error: Optional[str] = None  # why this item cannot be cropped (a failure record, not a crop)


@dataclass
class Listing:
    root: Path
    layout: str
    items: list  # list[Item], in the deterministic order
    seconds: float = 0.0
    problems: dict = field(default_factory=dict)  # kind -> [message, ...]
    # every path under the corpus dir that is not an item's video or transcript: kind -> [path
    # relative to the corpus dir, "/" at the end of a directory not walked], in walk order
    ignored: dict = field(default_factory=dict)

    def problem_lines(self, limit: int = 3) -> list[str]:
        out = []
        for kind, messages in sorted(self.problems.items()):
            out.append(f"{len(messages)} {kind} (failure records): " + "; ".join(messages[:limit])
                       + (" ..." if len(messages) > limit else ""))
        return out

    def ignored_lines(self, limit: int = 3, where: Optional[str] = None) -> list[str]:
        """One line per kind of ignored path (count, first paths), and where the full list is."""
        if not self.ignored:
            return []
        total = sum(len(p) for p in self.ignored.values())
        lines = [f"{total} paths under the corpus dir are not items"
                 + (f" (all of them: {where})" if where else "") + ":"]
        for kind in sorted(self.ignored, key=IGNORED_KINDS.index):
            paths = self.ignored[kind]
            lines.append(f"  {len(paths)} {kind}: " + ", ".join(paths[:limit]) + (" ..." if len(paths) > limit else ""))
        return lines


# why a path under the corpus dir is not an item (Listing.ignored's kinds, in the order shown)
IGNORED_KINDS = (
    "outside the layout",  # not where the layout puts videos (lrs3, vox2)
    "unknown extension",  # not a video extension the layout takes
    "text without a video",  # a .txt with no video of the same name beside it
    "duplicate id",  # a second video giving an id (the item is a failure record naming both)
    "not in manifest.include_ids",
    "id list",  # the file named by manifest.valid_ids / test_ids / include_ids
    "hidden",  # a name starting with '.' (a directory is not walked)
    "symlinked directory",  # not followed (it could loop or leave the corpus)
    "not a regular file",  # a video name that is a link to a directory, a pipe, a socket...
)


def list_items(cfg) -> list[Item]:
    """All items of the configured corpus with their split, in a deterministic order."""
    return scan_corpus(cfg).items


def corpus_root(cfg) -> Path:
    corpus = _get(cfg, "corpus")
    layout = _get(cfg, "layout") or "plain"
    if not corpus:
        raise ConfigError("corpus: no corpus directory given (set corpus=/path/to/videos)")
    root = Path(str(corpus)).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"corpus: {root} is not a directory")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: unknown layout '{layout}' (one of {', '.join(LAYOUTS)})")
    return root


class _Progress:
    """Says how far a long listing has come (every 15 s; a big corpus on a shared filesystem
    takes minutes), through ``echo`` (None: silent)."""

    def __init__(self, echo):
        self.echo, self.start, self.next, self.dirs = echo, time.time(), time.time() + 15, 0

    def dir_done(self, videos: int) -> None:
        self.dirs += 1
        if self.echo is not None and self.dirs % 256 == 0 and time.time() >= self.next:
            self.next = time.time() + 15
            self.echo(f"listing the corpus: {videos} videos in {self.dirs} directories so far "
                      f"({time.time() - self.start:.0f} s)")

    def note(self, what: str) -> None:
        """A phase starts: said once the listing has taken a while."""
        if self.echo is not None and time.time() - self.start >= 10:
            self.echo(f"listing the corpus: {what} ({time.time() - self.start:.0f} s)")



def scan_corpus(cfg, echo=None, output_suffixes: Sequence[str] = ()) -> Listing:
    """One walk of the corpus: every item with its split, text, source size/mtime and, for items
    that cannot be cropped, the reason; every other path under the corpus dir with the reason it
    is not an item (``Listing.ignored``). Raises ConfigError for settings that cannot work.
    ``echo(line)`` gets progress lines while a long listing runs. ``output_suffixes``: the
    extensions of the per-item output files (``<dir>/<id><suffix>``) whose clashes between ids
    make failure records (``output_clashes``)."""
    progress = _Progress(echo)
    t0 = time.time()
    root = corpus_root(cfg)
    layout = _get(cfg, "layout") or "plain"
    settings = corpus_settings(cfg)
    problems: dict[str, list[str]] = {}
    walk = _Walk(root, progress, _id_list_paths(settings, root))
    {"lrs3": _lrs3_videos, "vox2": _vox2_videos}.get(layout, _plain_videos)(walk)
    found = walk.found
    if not found:
        raise ConfigError(f"corpus: no videos found in {root} for layout '{layout}'")
    progress.note(f"{len(found)} videos found; reading their sizes and dates")
    stats = _stat_all([f[0] for f in found])
    if any(f[3] for f in found):
        progress.note("reading the transcripts")
    rows = _rows(layout, found, stats, settings, problems, walk)
    del stats
    del found
    rows = _merge_duplicates(rows, root, problems, walk)
    if settings.include_ids:
        keep = read_id_list(settings.include_ids, root, "manifest.include_ids")
        kept = _matching(rows, keep, "manifest.include_ids", settings.include_ids)
        if len(kept) < len(rows):
            used = {r[3] for r in kept}
            prefix = str(root) + "/"
            for path in dict.fromkeys(r[3] for r in rows if r[3] not in used):
                walk.ignore("not in manifest.include_ids", path[len(prefix):] if path.startswith(prefix) else path)
        rows = kept
    if output_suffixes:
        _mark_clashes(rows, output_suffixes, problems)
    split_of = assign_splits(rows, layout, root, settings)
    make = tuple.__new__  # Item(...) without its Python-level __new__: 1.1M of them
    items = [make(Item, (r[0], r[3], r[4], r[5], split_of[r[1]], r[6], r[1], r[2], r[7], r[8], r[9])) for r in rows]
    return Listing(root, layout, items, time.time() - t0, problems, walk.ignored)


def _id_list_paths(settings: CorpusSettings, root: Path) -> list[str]:
    """The id list files of the settings that lie in the corpus dir (reported as id lists, not
    as files the listing ignores)."""
    out = []
    for setting in (settings.valid_ids, settings.test_ids, settings.include_ids):
        if setting:
            path = Path(str(setting)).expanduser()
            path = path if path.is_absolute() else root / path
            if path.is_file():  # as the walk names it, and through links
                out += [os.path.normpath(path), str(path.resolve())]
    return out


def _get(cfg, key):
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    try:
        return cfg.get(key)  # DictConfig
    except AttributeError:
        return getattr(cfg, key, None)


# ---------------------------------------------------------------------------------------------
# ids and names

_NEEDS_ESCAPE = re.compile("[%\x00-\x1f\x7f\udc80-\udcff]")
_ESCAPED = re.compile("%([0-9A-Fa-f]{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def escape_id(name: str) -> str:
    """A path as the filesystem decoded it -> a valid UTF-8 id without control characters
    (``%``, control characters and undecodable bytes become ``%XX``); reversible."""
    if not _NEEDS_ESCAPE.search(name):
        return name

    def one(m):
        c = m.group(0)
        code = ord(c) - 0xDC00 if "\udc80" <= c <= "\udcff" else ord(c)
        return f"%{code:02X}"

    return _NEEDS_ESCAPE.sub(one, name)


def unescape_id(item_id: str) -> str:
    """The inverse of ``escape_id``: the path text as ``os.fsdecode`` gives it."""
    def one(m):
        code = int(m.group(1), 16)
        return chr(0xDC00 + code) if code >= 0x80 else chr(code)

    return _ESCAPED.sub(one, item_id)


def shown(path) -> str:
    """A path for messages and logs: undecodable bytes as ``\\xNN`` (a raw surrogate would make
    logging and ``print`` fail)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------
# transcripts


class TranscriptError(ValueError):
    """A transcript file cannot be used; the message names the file and the reason."""


def _decode(data: bytes, path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TranscriptError(f"transcript {shown(path)} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                              f"{e.start}); re-encode it as UTF-8 (its text is never guessed)") from None


def transcript_words(text: str) -> Optional[str]:
    """Words of a transcript: the ``Text:`` line if there is one, else the whole text;
    whitespace collapsed; None when empty."""
    for line in text.splitlines():
        if line.startswith("Text:"):
            return " ".join(line[len("Text:"):].split()) or None
    return " ".join(text.split()) or None


def word_table(text: str, where="") -> list[tuple[str, float, float]]:
    """The ``WORD START END [ASDSCORE]`` table of an LRS3 transcript, [] when it has none."""
    words = []
    in_table = False
    for n, line in enumerate(text.splitlines(), 1):
        fields_ = line.split()
        if not in_table:
            in_table = bool(fields_) and fields_[0] == "WORD"
            continue
        if not fields_:
            continue
        if len(fields_) < 3:
            raise ValueError(f"{where}:{n}: expected 'WORD START END [SCORE]', got {line!r}")
        try:
            words.append((fields_[0], float(fields_[1]), float(fields_[2])))
        except ValueError:
            raise ValueError(f"{where}:{n}: bad time in {line!r}") from None
    return words


def read_transcript(path: Path) -> Optional[str]:
    return transcript_words(_decode(Path(path).read_bytes(), path))


def read_word_table(path: Path) -> list[tuple[str, float, float]]:
    return word_table(_decode(Path(path).read_bytes(), path), shown(path))


def _parse_transcript(job):
    """(text, pieces or None, error or None, warning or None) of one transcript; ``job`` =
    (path, segmenting (max_seconds, min_pause) or None). Runs in pool workers."""
    path, segmenting = job
    try:
        text = _decode(Path(path).read_bytes(), path)
    except TranscriptError as e:
        return None, None, str(e), None
    except OSError as e:
        return None, None, f"transcript {shown(path)} cannot be read ({e.strerror or e})", None
    words = transcript_words(text)
    if segmenting is None:
        return words, None, None, None
    try:
        table = word_table(text, shown(path))
    except ValueError as e:
        return words, None, None, f"{e}; utterance kept whole"
    if not table:
        return words, None, None, None
    pieces = segment_words(table, *segmenting)
    if len(pieces) == 1:
        return words, None, None, None
    return words, [(s, e, " ".join(w) or None) for s, e, w in pieces], None, None


def _parse_chunk(jobs):
    return [_parse_transcript(j) for j in jobs]


def _parse_transcripts(jobs: list) -> list:
    # a pool pays from about 4 idle CPUs: bench/scale.py on 2 busy cores, 150k LRS3 transcripts:
    # 12.4 s CPU in one process, 17.1 s CPU with a pool of 2 (fork, pickling) and no faster
    workers = min(8, len(os.sched_getaffinity(0)))
    if workers < PARALLEL_MIN_CPUS or len(jobs) < PARALLEL_MIN_TRANSCRIPTS:
        return [_parse_transcript(j) for j in jobs]
    size = max(256, len(jobs) // (workers * 8))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(_parse_chunk, chunks) for r in part]


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
# the walk


# The walk yields plain tuples (a VoxCeleb2 listing makes 1.1M of them):
#   found: (path, id, part, transcript path or None)
#   rows:  (id, group, part, path, start, end, text, size, mtime_ns, error); the splitting code
#          reads (id, group, part) = row[:3]


def _scandir(path: str) -> tuple[list, list, list]:
    """(subdirectory names, file names, hidden names) of one directory, sorted; symlinked
    directories are among the files (told apart when they are classified). One ``scandir``; no
    ``stat`` (the entry type comes with the listing)."""
    dirs, files, hidden = [], [], []
    try:
        with os.scandir(path) as it:
            for e in it:
                name = e.name
                if name[0] == ".":
                    hidden.append(name + "/" if e.is_dir(follow_symlinks=False) else name)
                elif e.is_dir(follow_symlinks=False):
                    dirs.append(name)
                else:
                    files.append(name)
    except FileNotFoundError:
        return [], [], []
    except OSError as e:  # an unreadable directory: its videos would silently go missing
        raise ConfigError(f"corpus: cannot list {shown(path)} ({e.strerror or e}); fix its permissions or move it "
                          "out of the corpus") from None
    dirs.sort()
    files.sort()
    hidden.sort()
    return dirs, files, hidden


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel and name else rel or name


class _Walk:
    """One walk of the corpus dir: ``found`` gets the videos (see above), ``ignored`` (kind ->
    paths relative to the corpus dir) every other entry, so nothing under the corpus dir goes
    unmentioned. A directory the layout does not walk is one entry (``dir/``), not its files."""

    def __init__(self, root: Path, progress: _Progress, id_lists: Iterable[str] = ()):
        self.root = str(root)
        self.progress = progress
        self.found: list = []
        self.ignored: dict[str, list[str]] = {}
        self.id_lists = set(id_lists)  # absolute paths of the id list files under the corpus dir

    def ignore(self, kind: str, rel: str) -> None:
        """``rel``: relative to the corpus dir (kept printable: undecodable bytes as ``\\xNN``,
        control characters as ``%XX``, so ``ignored.tsv`` stays one line per path)."""
        rel = shown(rel)
        if _CONTROL.search(rel):
            rel = _CONTROL.sub(lambda m: f"%{ord(m.group(0)):02X}", rel)
        self.ignored.setdefault(kind, []).append(rel)

    def entries(self, rel: str) -> tuple[list, list]:
        """(dirs, files) of ``root/rel``; its hidden entries are ignored here."""
        dirs, files, hidden = _scandir(f"{self.root}/{rel}" if rel else self.root)
        for name in hidden:
            self.ignore("hidden", _join(rel, name))
        return dirs, files

    def other_file(self, rel_dir: str, name: str, kind: str) -> None:
        """A file that is not a video of the layout: ``kind``, unless it is an id list or a link
        to a directory."""
        rel = _join(rel_dir, name)
        path = f"{self.root}/{rel}"
        if path in self.id_lists:
            kind = "id list"
        elif os.path.isdir(path):  # a symlink (real directories are listed as directories)
            kind = "symlinked directory"
        self.ignore(kind, rel)

    def outside(self, rel_dir: str, dirs: list, files: list) -> None:
        for d in dirs:
            self.ignore("outside the layout", _join(rel_dir, d) + "/")
        for name in files:
            self.other_file(rel_dir, name, "outside the layout")

    def tree(self, base: str, depth: Optional[int], part: str, prefix: str, mp4_only: bool, want_txt: bool,
             rel: str = "") -> None:
        """Videos exactly ``depth`` directory levels below ``base`` (relative to the corpus dir;
        any depth when None); ids are ``prefix`` + the path below ``base``. Files above that
        depth and directories below it are outside the layout."""
        where = _join(base, rel)
        dirs, files = self.entries(where)
        if depth is None or depth == 0:
            self.videos_here(where, files, rel, part, prefix, mp4_only, want_txt)
        else:
            self.outside(where, [], files)
        self.progress.dir_done(len(self.found))
        if depth is None or depth > 0:
            for d in dirs:
                self.tree(base, None if depth is None else depth - 1, part, prefix, mp4_only, want_txt,
                          f"{rel}/{d}" if rel else d)
        else:
            self.outside(where, dirs, [])

    def videos_here(self, where: str, files: list, rel: str, part: str, prefix: str, mp4_only: bool,
                    want_txt: bool) -> None:
        dirpath = f"{self.root}/{where}" if where else self.root
        names = set(files) if want_txt else ()
        base = f"{prefix}{rel}/" if rel else prefix
        out = self.found
        others = []
        stems = set()
        for name in files:
            if mp4_only:
                if not name.endswith(".mp4"):
                    others.append(name)
                    continue
                stem = name[:-4]
            else:
                stem, ext = os.path.splitext(name)
                if ext.lower() not in VIDEO_EXTENSIONS:
                    others.append(name)
                    continue
            item_id = base + stem
            if _NEEDS_ESCAPE.search(item_id):
                item_id = escape_id(item_id)
            txt = None
            if want_txt:
                stems.add(stem)
                if f"{stem}.txt" in names:
                    txt = f"{dirpath}/{stem}.txt"
            out.append((f"{dirpath}/{name}", item_id, part, txt))
        for name in others:
            if want_txt and name.endswith(".txt"):
                if name[:-4] not in stems:
                    self.other_file(where, name, "text without a video")
            else:
                self.other_file(where, name, "unknown extension")

    def parts(self, names: Sequence[str], layout: str) -> list:
        """The layout's top-level directories present; every other top-level entry is outside
        the layout."""
        dirs, files = self.entries("")
        self.outside("", [d for d in dirs if d not in names], files)
        parts = [d for d in names if d in dirs]
        if not parts:
            raise ConfigError(f"corpus: {self.root} has " + ("neither dev/ nor test/" if layout == "vox2" else
                                                            "none of pretrain/, trainval/, test/")
                              + f" (layout {layout})")
        return parts


def _lrs3_videos(walk: _Walk) -> None:
    for part in walk.parts(("pretrain", "trainval", "test"), "lrs3"):
        # LRS3 videos are .mp4 only (the plain layout takes the other containers)
        walk.tree(part, 1, part, f"{part}/", True, True)


VOX2_COMPANIONS = ("aac", "txt")  # VoxCeleb2's audio and metadata trees beside mp4/: not videos


def _vox2_videos(walk: _Walk) -> None:
    """``<part>/<spk>/<clip>/<utt>.mp4`` and ``<part>/mp4/<spk>/<clip>/<utt>.mp4`` (both shapes
    occur in VoxCeleb2 copies; an utterance in both is a duplicate id)."""
    for part in walk.parts(("dev", "test"), "vox2"):
        dirs, files = walk.entries(part)
        walk.outside(part, [d for d in dirs if d in VOX2_COMPANIONS], files)
        before = len(walk.found)
        for d in dirs:
            if d == "mp4":
                walk.tree(f"{part}/mp4", 2, part, f"{part}/", True, False)
            elif d not in VOX2_COMPANIONS:
                walk.tree(f"{part}/{d}", 1, part, f"{part}/{d}/", True, False)
        if "mp4" in dirs and len(dirs) > 1:  # both shapes: in id order, as with one of them
            walk.found[before:] = sorted(walk.found[before:], key=lambda f: f[1])


def _plain_videos(walk: _Walk) -> None:
    walk.tree("", None, "", "", False, True)
    walk.found.sort(key=lambda f: f[1])


def _stat_chunk(paths: list) -> list:
    out = []
    for path in paths:
        try:
            st = os.stat(path)  # follows links: the size and mtime of the video itself
        except OSError as e:
            out.append(f"{shown(path)}: cannot be read ({e.strerror or e})")
            continue
        out.append((st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None)
    return out


def _stat_all(paths: list) -> list:
    """Per path (size, mtime_ns), None when it is not a regular file (a link to a directory), or
    the error. Threads: on a network filesystem each stat waits for the metadata server."""
    if len(paths) < 20000:
        return _stat_chunk(paths)
    size = 4096
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return [r for part in pool.map(_stat_chunk, chunks) for r in part]


def _rows(layout: str, found: list, stats: list, settings: CorpusSettings, problems: dict, walk: _Walk) -> list:
    segmenting = (settings.max_segment_seconds, settings.min_pause_seconds)
    jobs = [(txt, segmenting if part == "pretrain" else None) for _, _, part, txt in found if txt]
    parsed = iter(_parse_transcripts(jobs))
    rows, untranscribed = [], []
    for (path, item_id, part, txt), st in zip(found, stats):
        if st is None:  # a link to a directory, a pipe...
            walk.ignore("not a regular file", relative_to(path, walk.root))
            continue
        error = None
        if isinstance(st, str):
            error, size, mtime_ns = st, None, None
            problems.setdefault("unreadable videos", []).append(error)
        else:
            size, mtime_ns = st
        if txt is None:
            if layout == "lrs3" and error is None:
                untranscribed.append(shown(path))
            rows.append((item_id, item_id, part, path, None, None, None, size, mtime_ns, error))
            continue
        text, pieces, txt_error, warning = next(parsed)
        if warning:
            log.warning("%s", warning)
        if txt_error:
            problems.setdefault("unusable transcripts", []).append(txt_error)
            rows.append((item_id, item_id, part, path, None, None, None, size, mtime_ns, error or txt_error))
        elif pieces is None:
            rows.append((item_id, item_id, part, path, None, None, text, size, mtime_ns, error))
        else:
            rows.extend((f"{item_id}_{k}", item_id, part, path, s, e, t, size, mtime_ns, error)
                        for k, (s, e, t) in enumerate(pieces))
    if untranscribed:
        log.warning("%d LRS3 videos have no .txt transcript beside them (e.g. %s): kept, without text",
                    len(untranscribed), ", ".join(untranscribed[:3]))
    return rows


def _merge_duplicates(rows: list, root: Path, problems: dict, walk: _Walk) -> list:
    """Several videos giving one id (``a.mp4`` + ``a.mov``) become one item with an error that
    names them all: none is cropped (nothing says which one was meant) and the rest of the corpus
    proceeds. The item keeps the first file by VIDEO_EXTENSIONS order, then name."""
    if len({r[0] for r in rows}) == len(rows):
        return rows
    by_id: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        by_id.setdefault(row[0], []).append(k)

    def rank(k):
        ext = os.path.splitext(rows[k][3])[1].lower()
        return (VIDEO_EXTENSIONS.index(ext) if ext in VIDEO_EXTENSIONS else len(VIDEO_EXTENSIONS), rows[k][3])

    drop = set()
    for item_id, ks in by_id.items():
        if len(ks) < 2:
            continue
        ks = sorted(ks, key=rank)
        names = ", ".join(shown(os.path.relpath(rows[k][3], root)) for k in ks)
        msg = (f"{len(ks)} videos give the id '{item_id}' ({names}): none is used; rename all but one "
               f"(or move it out of the corpus)")
        problems.setdefault("duplicate ids", []).append(msg)
        keep = rows[ks[0]]
        rows[ks[0]] = keep[:6] + (None, keep[7], keep[8], msg)
        drop.update(ks[1:])
    kept = [row for k, row in enumerate(rows) if k not in drop]
    used = {row[3] for row in kept}  # a segment's video can still be used by its other segments
    for path in dict.fromkeys(rows[k][3] for k in sorted(drop)):
        if path not in used:
            walk.ignore("duplicate id", relative_to(path, walk.root))
    return kept


def relative_to(path: str, root: str) -> str:
    """``path`` relative to the directory ``root`` when under it (a string prefix: no syscall)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


# ---------------------------------------------------------------------------------------------
# output paths


def _fold(name: str) -> str:
    """What a case-insensitive (and, as macOS's, normalisation-insensitive) filesystem sees of a
    name: two names with one fold are one file there."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFC", name).casefold()


def output_clashes(ids: Sequence[str], suffixes: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``{id: [(other id, why), ...]}`` for the ids whose output files ``<dir>/<id><suffix>`` (one
    directory per suffix) would not be their own on some filesystem: ids equal but for case or
    Unicode normalisation (one file on a case-insensitive filesystem), and an id whose directory
    is another id's output file (``col`` and ``col.wav/x``: ``col.wav`` is both ``col``'s audio
    and a directory of ``col.wav/x``'s). Depends on the ids only, never on the filesystem or on
    which item is cropped first."""
    joined = "\n".join(ids)  # folded in one call: 1.1M ids in a fraction of a second
    keys = joined.lower().split("\n") if joined.isascii() else [_fold(i) for i in ids]
    del joined
    known = set(keys)
    # directories of dotted ids that are another id + an output suffix: (id, dir name, suffix, key)
    nested = []
    folded = [s.lower() for s in suffixes]
    for item_id in [i for i in ids if "." in i]:
        cut = item_id.rfind("/")
        if cut < 0 or "." not in item_id[:cut]:  # no dot in its directories: nothing to clash with
            continue
        dirs = item_id[:cut].split("/")
        for k in range(1, len(dirs) + 1):
            d = _fold("/".join(dirs[:k]))
            for suffix in folded:
                if d.endswith(suffix) and d[:-len(suffix)] in known:
                    nested.append((item_id, "/".join(dirs[:k]), suffix, d[:-len(suffix)]))
    if len(known) == len(keys) and not nested:
        return {}
    wanted = {n[3] for n in nested}
    by_key: dict[str, list[str]] = {}
    for key, item_id in zip(keys, ids):
        if key in wanted or len(known) < len(keys):
            by_key.setdefault(key, []).append(item_id)
    out: dict[str, list[tuple[str, str]]] = {}
    for members in by_key.values():
        for m in members if len(members) > 1 else ():
            out.setdefault(m, []).extend((o, "the ids differ only in case or accents: one file on a case-insensitive "
                                             "filesystem") for o in members if o != m)
    for item_id, name, suffix, key in nested:
        for other in by_key[key]:
            out.setdefault(item_id, []).append(
                (other, f"'{name}' is a directory of this item's outputs and the {suffix} output of '{other}'"))
            out.setdefault(other, []).append(
                (item_id, f"its {suffix} output '{other}{suffix}' is a directory of the outputs of '{item_id}'"))
    return out


def _mark_clashes(rows: list, suffixes: Sequence[str], problems: dict) -> None:
    """Every row whose outputs clash with another's (``output_clashes``) becomes a failure record
    naming the other: neither is cropped, whichever shard would run first."""
    clashes = output_clashes([r[0] for r in rows], suffixes)
    if not clashes:
        return
    for k, row in enumerate(rows):
        found = clashes.get(row[0])
        if found is None:
            continue
        msg = "; ".join(f"its output paths clash with those of '{other}' ({why})" for other, why in dict.fromkeys(found))
        msg += ": neither is cropped; rename one of the videos"
        problems.setdefault("output path clashes", []).append(f"{row[0]}: {msg}")
        if row[9] is None:
            rows[k] = row[:9] + (msg,)


# ---------------------------------------------------------------------------------------------
# splits


def _id_list_candidates(setting: str, root: Path) -> list[Path]:
    path = Path(str(setting)).expanduser()
    return [path] if path.is_absolute() else [Path(root) / path, Path.cwd() / path]


def id_list_settings(cfg, keys=("valid_ids", "test_ids", "include_ids")) -> dict:
    """``{manifest.<key>: the id list file and its content}`` of the id-list settings in ``keys``
    that are set (for a step's fingerprint: an edited list is a changed setting)."""
    section = _get(cfg, "manifest")
    root = Path(str(_get(cfg, "corpus") or ".")).expanduser()
    out = {}
    for key in keys:
        setting = _get(section, key)
        if setting:
            found = [c for c in _id_list_candidates(setting, root) if c.is_file()]
            out[f"manifest.{key}"] = f"{setting} ({file_content(found[0]) if found else 'missing'})"
    return out


def read_id_list(setting: str, root: Path, name: str) -> set[str]:
    candidates = _id_list_candidates(setting, root)
    for candidate in candidates:
        if candidate.is_file():
            ids = set()
            for line in candidate.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(escape_id(line) if _NEEDS_ESCAPE.search(line.replace("%", "")) else line)
            return ids
    raise ConfigError(f"{name}: id list {setting} not found (looked for {', '.join(map(str, candidates))})")


def _matching(units: Iterable, ids: set[str], name: str, setting: str) -> list:
    """The units (tuples starting ``(item id, group, ...)``) whose id or group is listed."""
    units = list(units)
    hits = [u for u in units if u[0] in ids or u[1] in ids]
    known = {u[0] for u in units} | {u[1] for u in units}
    missing = sorted(ids - known)
    if ids and not hits:
        raise ConfigError(
            f"{name}: none of the {len(ids)} ids in {setting} is in the corpus "
            f"(e.g. '{shown(missing[0])}'; corpus ids look like '{units[0][0]}')"
        )
    if missing:
        log.warning("%s: %d of %d ids in %s are not in the corpus (e.g. %s)", name, len(missing), len(ids),
                    setting, ", ".join(shown(m) for m in missing[:3]))
    return hits


def split_draw(seed: int, group: str) -> float:
    """The seeded per-video number in [0, 1) that decides a drawn split (stable: it depends on
    the seed and the video's id only)."""
    return _draws(seed, [group])[0] / 2.0**64


def _draws(seed: int, groups: Iterable[str]) -> list[int]:
    """``split_draw`` x 2**64 for many groups (a VoxCeleb2 listing draws 1.1M)."""
    blake2b, prefix = hashlib.blake2b, f"{seed}\0".encode()
    return [int.from_bytes(blake2b(prefix + g.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
            for g in groups]


def assign_splits(units: Sequence[tuple], layout: str, root: Path, settings: CorpusSettings) -> dict[str, str]:
    """``{group: split}`` for units: tuples starting ``(item id, group, part)`` (see the module
    docstring)."""
    part_of_group = {u[1]: u[2] for u in units}
    test_parts = {"test"} if layout in ("lrs3", "vox2") else set()
    split_of_group = {g: "test" if part in test_parts else "train" for g, part in part_of_group.items()}

    listed: dict[str, set[str]] = {}
    for split in ("valid", "test"):
        setting = getattr(settings, f"{split}_ids")
        if setting:
            hits = _matching(units, read_id_list(setting, root, f"manifest.{split}_ids"),
                             f"manifest.{split}_ids", setting)
            listed[split] = {u[1] for u in hits}
    if "valid" in listed and "test" in listed and listed["valid"] & listed["test"]:
        both = sorted(listed["valid"] & listed["test"])
        raise ConfigError(f"manifest.valid_ids and manifest.test_ids share {len(both)} ids (e.g. '{both[0]}')")
    for split, groups in listed.items():
        for g in groups:
            split_of_group[g] = split

    draws = []
    if "valid" not in listed:
        draws.append(("valid", settings.valid_fraction))
    if layout == "plain" and "test" not in listed:
        draws.append(("test", settings.test_fraction))
    draws = [(split, fraction) for split, fraction in draws if fraction > 0]
    pool_parts = {"trainval"} if layout == "lrs3" else {"dev", ""}
    pool = [g for g, part in part_of_group.items() if part in pool_parts and split_of_group[g] == "train"]
    if not draws or not pool:
        return split_of_group
    draw = _draws(settings.split_seed, pool)
    low = 0.0
    for split, fraction in draws:
        lo, hi = int(low * 2**64), int((low + fraction) * 2**64)
        chosen = [g for g, d in zip(pool, draw) if lo <= d < hi]
        if not chosen:  # a tiny corpus: still one video
            rest = [(d, g) for g, d in zip(pool, draw) if split_of_group[g] == "train"]
            chosen = [min(rest)[1]] if rest else []
        for g in chosen:
            split_of_group[g] = split
        low += fraction
    if "train" not in split_of_group.values():
        names = " and ".join(f"manifest.{s}_fraction={f}" for s, f in draws)
        raise ConfigError(f"{names}: the corpus has only {len(pool)} candidate videos and none is left "
                          f"for train; give id lists or lower the fractions")
    return split_of_group
