"""The same inputs and config give byte-identical outputs: crop -> manifest -> features -> kmeans
-> labels (iteration 1, smoke preset, local executor) run again in another work dir is compared,
file by file and byte by byte with nothing normalised, with the session's smoke run.

Left out of the comparison: WORKDIR/.pipeline/ (completion markers with host, pid, time and job
ids, per-shard logs, submitit folders, config.yaml with the work dir's path: the engine's state),
WORKDIR/report/ (the run report written at the end of a launch: launch times and commands;
not written here) and each step's provenance.json (what made it: command, host and times). Everything the stages write is compared, including the frozen item list, crop
records with their quality figures, contact sheets, landmarks, tsv files (their root is
relative), the sentencepiece model, features, kmeans.joblib, labels, report.json and
cluster_usage.png."""
from __future__ import annotations

from pathlib import Path

from corpus_helpers import launch_here

STEPS = (("crop", None), ("manifest", None), ("features", 1), ("kmeans", 1), ("labels", 1))
COMPARED = ("crop", "manifest", "iter1/features", "iter1/kmeans", "iter1/labels")


def files_under(work: Path) -> dict:
    from pipeline.provenance import PROVENANCE

    return {p.relative_to(work).as_posix(): p for d in COMPARED for p in sorted((work / d).rglob("*"))
            if p.is_file() and p.name != PROVENANCE}


def test_crop_to_labels_twice_gives_the_same_bytes(smoke_run, sample_corpus, tmp_path, capsys, no_run_report):
    work = tmp_path / "second" / "work"
    for stage, iteration in STEPS:
        argv = ["--stage", stage, "--preset", "smoke", "--cluster", "local", "--workdir", work,
                "--corpus", sample_corpus] + (["--iteration", iteration] if iteration else [])
        rc, out = launch_here(argv, capsys)
        assert rc == 0, f"{stage}: {out}"
    mine, theirs = files_under(work), files_under(smoke_run)
    assert len(mine) > 70 and "manifest/spm/spm_unigram64.model" in mine and "iter1/kmeans/kmeans.joblib" in mine
    assert sorted(mine) == sorted(theirs)
    differ = [name for name in mine if mine[name].read_bytes() != theirs[name].read_bytes()]
    assert differ == []
    # no path of either work dir anywhere in an output
    for path in mine.values():
        assert str(work).encode() not in path.read_bytes(), path
