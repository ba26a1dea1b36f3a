"""Helpers of the report tests: a real headless Chromium, the bad clips a user meets (a frozen
frame with speech, a clip that turns black halfway, a file that is not a video), a copy of a work
dir that leaves the original untouched."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# stage outputs that are only ever replaced whole (atomic rename), never written in place: safe to
# hard-link from a shared read-only run; everything else (markers, logs, lists) is copied
LINKABLE = {".pt", ".npy", ".mp4", ".wav", ".npz", ".joblib", ".png", ".km"}


def find_chromium() -> Optional[str]:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Rendered:
    check: dict  # what the page's own self-check wrote: images, broken, errors
    dom: str  # the DOM after load (text)
    console_errors: List[str]
    screenshot: Path


def render(chromium: str, html: Path, screenshot: Path, profile: Path, width: int = 1366) -> Rendered:
    """Load ``html`` in headless Chromium: the DOM after the load event (with the page's
    data-report-check attribute: images, broken ones, script errors, page height) and a
    screenshot of the whole page. Console errors (uncaught exceptions) are collected from
    Chromium's log."""
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
    url = html.resolve().as_uri()
    dom = subprocess.run(base + [f"--window-size={width},900", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-report-check="([^"]*)"', dom.stdout)
    check = json.loads(unescape(m.group(1))) if m else {}
    height = min(int(check.get("height") or 4000) + 10, 16000)
    shot = subprocess.run(base + [f"--window-size={width},{height}", f"--screenshot={screenshot}", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    errors = [ln for ln in (dom.stderr + shot.stderr).splitlines()
              if ":CONSOLE" in ln and re.search(r"Uncaught|Error", ln)]
    return Rendered(check, dom.stdout, errors, screenshot)


def make_bad_clips(source: Path, out: Path) -> dict:
    """From one real talking clip (with speech): ``frozen`` (its first frame held for 1.6 s over
    its speech), ``black_half`` (1.2 s of it, black from 0.6 s on) and ``broken`` (not a video).
    Scaled to 320 px wide: smaller frames, quicker crops."""
    from avprep.media import ffmpeg_exe

    out.mkdir(parents=True, exist_ok=True)
    ff = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y"]
    enc = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"]
    clips = {"frozen": out / "frozen.mp4", "black_half": out / "black_half.mp4", "broken": out / "broken.mp4"}
    subprocess.run(ff + ["-i", str(source), "-filter_complex",
                         "[0:v]trim=end_frame=1,scale=320:-2,loop=loop=-1:size=1:start=0,setpts=N/(25*TB)[v]",
                         "-map", "[v]", "-map", "0:a", "-t", "1.6", "-r", "25", *enc, str(clips["frozen"])], check=True)
    subprocess.run(ff + ["-i", str(source), "-t", "1.2", "-vf",
                         "scale=320:-2,drawbox=enable='gte(t,0.6)':color=black:t=fill", *enc,
                         str(clips["black_half"])], check=True)
    clips["broken"].write_bytes(b"this is not a video file\n" * 40)
    return clips


def copy_workdir(src: Path, dst: Path) -> Path:
    """A private copy of a work dir: big outputs hard-linked (the stages only ever replace them
    whole), everything else copied, so nothing written in the copy reaches ``src``."""

    def copy(s, d):
        if Path(s).suffix in LINKABLE or "tensorboard" in Path(s).parts:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy, symlinks=True)
    return dst


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([PYTHON, str(REPO_ROOT / "launch.py"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=timeout)


def make_phone_clip(source: Path, out: Path) -> Path:
    """What a phone writes: 1.2 s of ``source`` (320 px wide) stored turned 90 degrees with a
    display matrix that turns it back upright."""
    from avprep.media import ffmpeg_exe

    ff = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y"]
    stored = out.with_name(out.stem + ".stored.mp4")
    subprocess.run(ff + ["-i", str(source), "-t", "1.2", "-vf", "scale=320:-2,transpose=1", "-c:v", "libx264",
                         "-pix_fmt", "yuv420p", "-c:a", "aac", str(stored)], check=True)
    subprocess.run(ff + ["-display_rotation", "90", "-i", str(stored), "-c", "copy", str(out)], check=True)
    stored.unlink()
    return out


def launch_in_process(*argv: str) -> int:
    """``launch.py`` in this process (debug executor: shards run here), without the end-of-launch
    report (the test writes the report once, when every output is in place)."""
    import contextlib
    import io

    import pytest

    import launch as launcher
    import report

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        patch.setattr(report, "at_end_of_launch", lambda *a, **k: [])
        rc = launcher.main(list(argv))
    assert rc == 0, out.getvalue()[-3000:]
    return rc


NOISE_ARGS = ["noise.enabled=true", "noise.corpus_categories={babble: 3, speech: 0}", "noise.corpus_clips={train: 2, valid: 1, test: 1}",
              "noise.clip_seconds=2"]


def add_noise_and_units(work: Path, corpus: Path, scratch: Path) -> dict:
    """The rest of what a run can hold, made by the stages' own code in ``work`` (a copy of the
    smoke run): the noise stage (3-talker babble from the corpus and a 50 Hz hum recording), the
    units of iteration 2's k-means for valid and test, and fine-tuning's WER-under-noise table
    written by ``stages.finetune.evaluate_under_noise``. Its decoder is the one stand-in: decoding
    17 conditions costs a minute (tests/noise decodes them for real); here each condition's
    hypotheses are the references with words dropped as the SNR falls, scored by the shared WER."""
    import numpy as np
    import soundfile as sf

    hum = scratch / "hum_recording"
    hum.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000 * 35) / 16000  # 10 s pieces: 2 train, then valid, test
    sf.write(str(hum / "hum.wav"), (0.1 * np.sin(2 * np.pi * 50 * t) * 32767).astype(np.int16), 16000)
    noise_args = [*NOISE_ARGS, f"noise.dirs=[hum={hum}]"]
    common = ["--preset", "smoke", "--cluster", "debug", "--workdir", str(work), "--corpus", str(corpus)]
    launch_in_process("--stage", "noise", *common, *noise_args)
    launch_in_process("--stage", "units", *common, "units.kmeans_iteration=2", "units.splits=[valid,test]")

    from pipeline.config import load_config
    from pipeline.stage import StageContext
    from speechfeat.wer import word_error_rate
    from stages import config_sections
    from stages import finetune as ft

    eval_args = ["finetune.noise.eval_snrs=[-5,0,5]", "finetune.noise.eval_modalities=[audio,av]",
                 "finetune.noise.eval_splits=[test]"]
    cfg = load_config(config_sections(), "smoke", "debug", [*noise_args, *eval_args],
                      {"workdir": str(work), "corpus": str(corpus)})
    ctx = StageContext(cfg=cfg, workdir=work, iteration=None)
    rows = (work / "manifest" / "test.tsv").read_text().splitlines()[1:]
    refs = (work / "manifest" / "test.wrd").read_text().splitlines()
    ids = [r.split("\t")[0] for r in rows]

    class WordDropper:  # the decoder's interface: score(split, modality, noise) -> scores, its generation
        beam, lenpen = 5, 1.0

        def score(self, split, modality, noise):
            drop = 0 if noise is None else ({5.0: 1, 0.0: 2, -5.0: 3}[float(noise["snr"])] + (modality == "audio")
                                            + (noise["category"] == "babble"))
            results = [(i, r, " ".join(r.split()[drop:])) for i, r in zip(ids, refs)]
            return {**word_error_rate(results), "hypotheses": [list(x) for x in results]}

    results_path = work / "finetune" / "results.json"
    results = json.loads(results_path.read_text())
    checkpoint = work / "finetune" / "checkpoints" / "checkpoint_final.pt"
    results["noise"] = ft.evaluate_under_noise(ctx, WordDropper(), checkpoint, {})
    results_path.write_text(json.dumps(results, indent=1))
    return results["noise"]
