"""Corpus layouts: which items (videos or segments of videos) a corpus holds, their split and text.

Interface used by the crop and manifest stages (implementation: see list_items)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Item:
    id: str  # unique; may contain '/', e.g. "spk01/00001" (LRS3) or "clip_003" (plain)
    video: str  # absolute path of the source video
    start: Optional[float] = None  # seconds into the video; None = from the beginning
    end: Optional[float] = None  # seconds; None = to the end
    split: str = "train"  # train | valid | test
    text: Optional[str] = None  # transcript words, or None when the corpus has none


def list_items(cfg) -> list[Item]:
    raise NotImplementedError("written by the manifest/corpus work")
