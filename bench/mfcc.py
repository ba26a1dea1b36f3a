"""MFCC throughput: speechfeat.mfcc.mfcc39 against the reference's own code, side by side.

The reference (dump_mfcc_feature.py) computes ``torchaudio.compliance.kaldi.mfcc(use_energy=False)``
then ``torchaudio.functional.compute_deltas`` twice. torchaudio cannot be imported beside this
project's torch (its C extension is built for another torch), but those functions are pure torch.
So the bench downloads the torchaudio wheel once into a cache (``pip download --no-deps``; never
committed), unpacks only ``torchaudio/compliance/`` and ``torchaudio/functional/`` and loads those
source files under a stand-in ``torchaudio`` package whose ``_extension`` says the C extension is
unavailable (the package's own ``__init__``, which loads the extension, is never run). The code
timed is therefore torchaudio's, unchanged.

    .venv/bin/python bench/mfcc.py [--seconds 2 6 15] [--total 120] [--repeats 5]

Per utterance length: the same utterances (noise-like audio; the cost does not depend on the
content) go through both implementations, one torch/BLAS thread each, interleaved reference/ours
``--repeats`` times so machine load hits both; timed in process CPU seconds (one thread each: on
a shared machine this moves less with load than wall time); prints real-time factors per core, their ratio (median and
spread over the repeats) and the largest absolute difference of the features. With the golden
file (../shared/golden/ref_mfcc.npz beside the repo) both are also compared with it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TORCHAUDIO_VERSION = "2.11.0"
GOLDEN = ROOT / "tests" / "data" / "golden" / "ref_mfcc.npz"  # the repository's copy of the golden file


def cache_dir() -> Path:
    base = Path(os.environ.get("AVHUBERT_PIPELINE_CACHE", Path.home() / ".cache" / "avhubert-pipeline"))
    return base / "bench" / f"torchaudio-{TORCHAUDIO_VERSION}"


def load_reference():
    """torchaudio's ``compliance.kaldi.mfcc`` and ``functional.compute_deltas``, loaded from the
    wheel's source files without its C extension."""
    cache = cache_dir()
    src = cache / "src"
    if not (src / "torchaudio" / "compliance" / "kaldi.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache.glob("torchaudio-*.whl"))
        if not wheels:
            print(f"downloading the torchaudio {TORCHAUDIO_VERSION} wheel into {cache} (once)", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            f"torchaudio=={TORCHAUDIO_VERSION}", "-d", str(cache)], check=True,
                           stdout=subprocess.DEVNULL)
            wheels = sorted(cache.glob("torchaudio-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as zf:
            for name in zf.namelist():
                if name.startswith(("torchaudio/compliance/", "torchaudio/functional/")) and name.endswith(".py"):
                    zf.extract(name, src)
    if "torchaudio" in sys.modules and not getattr(sys.modules["torchaudio"], "_bench_stand_in", False):
        raise RuntimeError("the real torchaudio is already imported")
    root = src / "torchaudio"

    def package(name: str, path: Path) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        mod._bench_stand_in = True
        sys.modules[name] = mod
        return mod

    ta = package("torchaudio", root)
    ext = types.ModuleType("torchaudio._extension")
    ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
    sys.modules[ext.__name__] = ext
    ta._extension = ext
    ta.functional = package("torchaudio.functional", root / "functional")
    ta.compliance = package("torchaudio.compliance", root / "compliance")
    import importlib

    functional = importlib.import_module("torchaudio.functional.functional")
    # what kaldi.py calls through the package: torchaudio.functional.create_dct
    ta.functional.create_dct = functional.create_dct
    ta.functional.compute_deltas = functional.compute_deltas
    kaldi = importlib.import_module("torchaudio.compliance.kaldi")
    return kaldi.mfcc, functional.compute_deltas


def reference_mfcc39(mfcc, compute_deltas):
    import torch

    def run(wav_int16: np.ndarray) -> np.ndarray:
        # dump_mfcc_feature.py: soundfile's float samples, then the torch code
        x = wav_int16.astype(np.float64) / 32768.0
        with torch.no_grad():
            x = torch.from_numpy(x).float().view(1, -1)
            m = mfcc(waveform=x, sample_frequency=16000, use_energy=False).transpose(0, 1)
            d = compute_deltas(m)
            dd = compute_deltas(d)
            return torch.cat([m, d, dd], dim=0).transpose(0, 1).contiguous().numpy()

    return run


def utterances(seconds: float, total: float, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    n = max(1, int(round(total / seconds)))
    out = []
    for _ in range(n):
        t = np.arange(int(seconds * 16000)) / 16000
        x = rng.normal(size=len(t)) * 2000 + 4000 * np.sin(2 * np.pi * rng.uniform(100, 300) * t)
        out.append(np.clip(x, -32768, 32767).astype(np.int16))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.0, 6.0, 15.0],
                    help="utterance lengths (LRS3 pretrain segments are at most 15 s)")
    ap.add_argument("--total", type=float, default=120.0, help="seconds of audio per length and repeat")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from speechfeat.mfcc import mfcc39

    ref = reference_mfcc39(*load_reference())
    impls = {"reference": ref, "ours": mfcc39}
    print(f"torch {torch.__version__}, torchaudio {TORCHAUDIO_VERSION} sources; threads: torch "
          f"{torch.get_num_threads()}, OMP {os.environ.get('OMP_NUM_THREADS')}; {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}")
    if GOLDEN.is_file():
        g = np.load(GOLDEN)
        for name, f in impls.items():
            print(f"golden ref_mfcc.npz: {name} max abs diff {np.abs(f(g['wav']) - g['mfcc39']).max():.2e}")
    for seconds in a.seconds:
        utts = utterances(seconds, a.total)
        diff = max(np.abs(ref(u) - mfcc39(u)).max() for u in utts[:5])
        audio = len(utts) * seconds
        rtf = {k: [] for k in impls}
        for _ in range(a.repeats):
            for name, f in impls.items():  # interleaved: load changes hit both
                t = time.process_time()  # CPU time: one thread each, so load inflates it less than wall time
                for u in utts:
                    f(u)
                rtf[name].append(audio / (time.process_time() - t))
        ratios = [o / r for o, r in zip(rtf["ours"], rtf["reference"])]
        print(f"{seconds:5.1f} s utterances x {len(utts)}: reference {statistics.median(rtf['reference']):7.0f}x "
              f"real time, ours {statistics.median(rtf['ours']):7.0f}x; ours/reference "
              f"{statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f} over "
              f"{a.repeats} runs); max abs diff {diff:.1e}")


if __name__ == "__main__":
    main()
