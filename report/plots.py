"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes to inline."""
from __future__ import annotations

import io
import logging
from typing import Dict, List, Optional, Sequence

from avprep import quality
from report.crop_scan import HIST_BINS

COLOURS = {"train": "#1f6fb4", "valid": "#e07b1a", "test": "#3a9a4a"}
FIGURE_TITLES = {
    "face_share": "share of frames with a face",
    "face_px": "face height (source px)",
    "jitter": "jitter after smoothing (% IOD)",
    "roll_deg": "face roll (degrees)",
    "motion": "mouth motion (gray levels)",
    "static_share": "static frame pairs (share)",
    "brightness": "ROI brightness",
    "contrast": "ROI contrast (std)",
    "blank_share": "blank ROI frames (share)",
    "words_per_s": "transcript words per second of audio",
}
# figure -> bound attributes drawn on its histogram
FIGURE_BOUNDS = {
    "face_share": ("min_face_share",), "face_px": ("min_face_px",), "jitter": ("max_jitter",),
    "roll_deg": ("max_roll_deg",), "motion": ("min_motion",), "static_share": ("max_static_share",),
    "brightness": ("min_brightness", "max_brightness"), "contrast": ("min_contrast",),
    "blank_share": ("max_blank_share",),
    "words_per_s": ("min_words_per_s", "max_words_per_s"),
}


def _plt():
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font search floods a DEBUG log
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titlesize": 9, "axes.titleweight": "bold"})
    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return buf.getvalue()


def _panels(n: int, height: float):
    """A figure of ``n`` panels, at most 3 a row."""
    cols = min(3, n)
    rows = -(-n // cols)
    return _plt().subplots(rows, cols, figsize=(3.6 * cols, height * rows), squeeze=False)


def _panels_png(fig, axes, n: int) -> bytes:
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def quality_histograms(hist: Dict[str, list], bounds: quality.QualityBounds) -> bytes:
    """One histogram per quality figure over the whole corpus, the flag bounds as red lines."""
    plt = _plt()
    names = [f for f in HIST_BINS if f in hist]
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        lo, hi, n = HIST_BINS[name]
        width = (hi - lo) / n
        ax.bar([lo + (i + 0.5) * width for i in range(n)], hist[name], width=width * 0.92, color="#5b7fa6")
        for attr in FIGURE_BOUNDS.get(name, ()):
            b = float(getattr(bounds, attr))
            for x in ((-b, b) if name == "roll_deg" else (b,)):
                if lo <= x <= hi:
                    ax.axvline(x, color="#d62728", ls="--", lw=1)
        if max(hist[name] or [0]) > 100:  # a large corpus: the flagged tails would vanish on a linear axis
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.7)  # bars from one item up
        ax.set_title(FIGURE_TITLES.get(name, name))
        ax.set_xlim(lo, hi)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.supylabel("items", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def label_metrics(rows: List[dict]) -> Optional[bytes]:
    """Across iterations: clusters used (share of K), entropy (share of its maximum), cluster and
    character purity, mutual information with the characters; one line per split."""
    if not rows:
        return None
    plt = _plt()
    panels = [("clusters used (share of K)", lambda r: r["clusters_used"] / max(r["n_clusters"], 1)),
              ("entropy / max entropy", lambda r: r["entropy_bits"] / max(r["max_entropy_bits"], 1e-9)),
              ("cluster purity (chars)", lambda r: r.get("cluster_purity")),
              ("mutual information (bits)", lambda r: r.get("mutual_information_bits"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 2.6), squeeze=False)
    splits = sorted({r["split"] for r in rows}, key=lambda s: (s != "train", s))
    iterations = sorted({r["iteration"] for r in rows})
    for ax, (title, get) in zip(axes[0], panels):
        for split in splits:
            pts = [(r["iteration"], get(r)) for r in rows if r["split"] == split]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4, label=split,
                        color=COLOURS.get(split), ls="-" if split == "train" else "--")
        ax.set_title(title)
        ax.set_xticks(iterations)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def loss_curves(series: Dict[str, dict]) -> Optional[bytes]:
    """One panel per run ("iteration 1", ..., "fine-tuning"): training and validation loss per update."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = _panels(len(series), 2.6)
    for ax, (name, s) in zip(axes.flat, series.items()):
        for split, style in (("train", "-"), ("valid", "--")):
            pts = s.get(split) or []
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o" if len(pts) < 40 else None,
                        ms=3, color=COLOURS[split], label=split)
        ax.set_title(name)
        ax.set_xlabel("update")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _panels_png(fig, axes, len(series))


def step_times(names: Sequence[str], seconds: Sequence[float]) -> Optional[bytes]:
    """Horizontal bars: the job time of each step (sum over its shards)."""
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(names) + 0.9))
    hours = max(seconds or [0]) > 3 * 3600
    values = [s / 3600 if hours else s / 60 for s in seconds]
    ax.barh(range(len(names)), values, color="#5b7fa6")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("job time (hours)" if hours else "job time (minutes)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def noise_wer(table: Dict[str, dict], snrs: Sequence[str]) -> Optional[bytes]:
    """WER against SNR, one panel per split x input (modality), one line per noise category, the
    clean WER as a dotted line (fine-tuning's results.json["noise"]["wer"])."""
    panels = [(split, modality, cells) for split, per in table.items() for modality, cells in per.items()
              if any(c != "clean" for c in cells) or cells.get("clean") is not None]
    if not panels:
        return None
    fig, axes = _panels(len(panels), 2.7)
    xs = [float(s) for s in snrs]
    for ax, (split, modality, cells) in zip(axes.flat, panels):
        for category, by_snr in cells.items():
            if category == "clean" or not isinstance(by_snr, dict):
                continue
            pts = [(x, by_snr.get(k)) for x, k in zip(xs, snrs) if by_snr.get(k) is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4, label=category)
        if cells.get("clean") is not None:
            ax.axhline(float(cells["clean"]), color="#444", ls=":", lw=1.2, label="clean")
        ax.set_title(f"{split} · {modality}")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel("WER (%)")
        if xs:
            ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _panels_png(fig, axes, len(panels))
