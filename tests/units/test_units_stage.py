"""The units stage on a copy of the smoke run: its units equal iteration 2's labels (same
checkpoint, layer and k-means), the three output forms agree, k-means trained here, settings
guarded, and `--stage all` leaves it out unless asked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from speechfeat.units import parse_rle_line, parse_units_line


@pytest.fixture(autouse=True)
def no_run_report(monkeypatch):
    """These tests launch a dozen times in one work dir; the run report written at the end of
    each launch (1.5-8 s here, tested in tests/report) is left out."""
    import report

    monkeypatch.setattr(report, "at_end_of_launch", lambda *args, **kwargs: [])


def launch(*argv) -> int:
    import launch as launcher

    return launcher.main(list(argv))


def read_lines(path: Path) -> list:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_units_equal_iteration_labels(work_copy, capsys):
    rc = launch("--stage", "units", "--workdir", str(work_copy), "--cluster", "debug", "units.kmeans_iteration=2")
    out = capsys.readouterr()
    assert rc == 0, out.err
    units = work_copy / "units"
    for split in ("train", "valid"):  # the splits iteration 2 labelled
        labels = read_lines(work_copy / "iter2" / "labels" / f"{split}.km")
        lines = read_lines(units / f"{split}.units")
        assert len(lines) == len(labels) > 0
        assert lines == labels, f"{split}: units differ from iteration 2's labels"
    summary = json.loads((units / "summary.json").read_text())
    assert summary["layer"] == 1 and summary["n_clusters"] == 20
    assert summary["settings"]["checkpoint"] == "iter1/train/checkpoints/checkpoint_final.pt"
    from speechfeat.shards import read_tsv

    for split in ("train", "valid", "test"):
        _, rows = read_tsv(work_copy / "manifest" / f"{split}.tsv")
        full = [parse_units_line(line) for line in read_lines(units / f"{split}.units")]
        rle = [parse_rle_line(line) for line in read_lines(units / f"{split}.rle")]
        records = [json.loads(line) for line in read_lines(units / f"{split}.jsonl")]
        assert len(full) == len(rle) == len(records) == len(rows)
        for row, u, r, rec in zip(rows, full, rle, records):
            assert len(u) == row.n_video_frames and ((u >= 0) & (u < 20)).all()
            assert np.array_equal(r, u)  # deduplicated units expand back to the full sequence
            assert rec["id"] == row.id and rec["hubert"] == " ".join(map(str, u))
            assert Path(rec["audio"]).is_file() and rec["audio"].endswith(row.audio)
            assert rec["duration"] == pytest.approx(row.n_audio_samples / 16000)
        assert summary["splits"][split]["frames"] == sum(r.n_video_frames for r in rows)
    assert read_lines(units / "dict.units.txt") == [f"{i} 1" for i in range(20)]

    # same settings: complete, nothing to do; a lost shard output: that shard alone runs again,
    # giving the same bytes; other settings: refused before anything runs
    assert launch("--stage", "units", "--workdir", str(work_copy), "--cluster", "debug",
                  "units.kmeans_iteration=2") == 0
    assert "nothing to do" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in units.glob("*.*") if p.name != "provenance.json"}  # launch times
    (units / "shards" / "test_0_1.rle").unlink()
    assert launch("--stage", "units", "--workdir", str(work_copy), "--cluster", "debug",
                  "units.kmeans_iteration=2") == 0
    assert "submitting 1/3 shard(s)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in units.glob("*.*") if p.name != "provenance.json"} == before
    rc = launch("--stage", "units", "--workdir", str(work_copy), "--cluster", "debug",
                "units.kmeans_iteration=2", "units.modality=audio")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--redo-changed" in err
    assert "units was made with other settings (units.modality av -> audio): restore units.modality=av" in err


def test_units_with_kmeans_trained_here(work_copy, capsys):
    out_dir = work_copy.parent / "units_k8"
    args = ["--stage", "all", "--workdir", str(work_copy), "--cluster", "debug", "units.n_clusters=8",
            "units.layer=2", "units.splits=[valid]", "units.kmeans_percent=0.25", f"units.out_dir={out_dir}"]
    rc = launch(*args)
    out = capsys.readouterr()
    assert rc == 0, out.err
    # everything else of the smoke run was complete: only the two units steps ran
    ran = [line for line in out.out.splitlines() if "submitting" in line]
    assert len(ran) == 2 and "[units_kmeans]" in ran[0] and "[units]" in ran[1], out.out
    from speechfeat.kmeans import load_model
    from speechfeat.shards import read_tsv

    model = load_model(out_dir / "kmeans.joblib")
    assert model["centroids"].shape == (8, 64) and model["layer"] == 2
    assert model["units_settings"]["checkpoint"] == "iter2/train/checkpoints/checkpoint_final.pt"
    _, rows = read_tsv(work_copy / "manifest" / "train.tsv")
    from stages.units_kmeans import sample_rows

    sampled = sample_rows(rows, 0.25, 500_000, 0)
    assert len(sampled) == 4 and model["n_frames"] == sum(rows[i].n_video_frames for i in sampled)
    _, rows = read_tsv(work_copy / "manifest" / "valid.tsv")
    units = [parse_units_line(line) for line in read_lines(out_dir / "valid.units")]
    assert [len(u) for u in units] == [r.n_video_frames for r in rows]
    assert len(np.unique(np.concatenate(units))) > 1 and np.concatenate(units).max() < 8
    assert not (out_dir / "train.units").exists()
    # a different K in the same directory is refused: the k-means and units there have K=8 (another
    # units.out_dir was not: its settings are those of that directory)
    rc = launch(*[a if a != "units.n_clusters=8" else "units.n_clusters=9" for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and "units_kmeans was made with other settings (units.n_clusters 8 -> 9)" in err
    # retrained with K=9 (--force): the units step read the old k-means, so it is stale and its
    # units are made again with the new one without being asked (the engine's rule for a step
    # whose input was redone)
    k9 = [a if a != "units.n_clusters=8" else "units.n_clusters=9" for a in args[2:]]
    assert launch("--stage", "units_kmeans", "--force", *k9) == 0
    assert load_model(out_dir / "kmeans.joblib")["centroids"].shape == (9, 64)
    capsys.readouterr()
    assert launch("--stage", "units", *k9) == 0
    assert "[units] stale: its input units_kmeans was redone since it ran" in capsys.readouterr().out
    assert json.loads((out_dir / "summary.json").read_text())["n_clusters"] == 9
    units = [parse_units_line(line) for line in read_lines(out_dir / "valid.units")]
    assert np.concatenate(units).max() < 9 and [len(u) for u in units] == [r.n_video_frames for r in rows]



def test_units_stage_off_unless_asked(work_copy, tmp_path):
    from launch import APP
    from pipeline.cli import parse_args, plan

    def planned(*overrides):
        # a dry run checks the settings against the units already in units.out_dir: a fresh one
        out = tmp_path / f"units{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        args = parse_args(APP, ["--workdir", str(work_copy), "--dry-run", *overrides, f"units.out_dir={out}"])
        _, _, steps = plan(APP, args, dry_run=True)
        return [s.stage.name for s in steps]

    assert "units" not in planned() and "units_kmeans" not in planned()
    assert planned("units.kmeans_iteration=2")[-1] == "units"
    assert "units_kmeans" not in planned("units.kmeans_iteration=2")
    assert planned("units.n_clusters=50")[-2:] == ["units_kmeans", "units"]
    # switched off and given a units setting on the same command line: the setting does nothing
    with pytest.raises(ConfigError, match="units.n_clusters=50 does nothing: units_kmeans and units are not part"):
        planned("units.n_clusters=50", "units.enabled=false")


@pytest.mark.parametrize("overrides, message", [
    ([], "exactly one of units.kmeans=PATH"),
    (["units.n_clusters=5", "units.kmeans_iteration=2"], "got units.kmeans_iteration, units.n_clusters"),
    (["units.kmeans_iteration=1"], "iteration 1 clusters mfcc"),
    (["units.kmeans_iteration=2", "units.layer=2"], "trained on layer 1"),
    (["units.n_clusters=1"], "at least 2 clusters"),
    (["units.kmeans=/nonexistent/km.joblib"], "units.kmeans=/nonexistent/km.joblib: file not found"),
    (["units.n_clusters=5", "units.splits=[dev]"], "split 'dev'"),
])
def test_units_settings_refused_with_one_line(work_copy, capsys, overrides, message):
    rc = launch("--stage", "units", "--workdir", str(work_copy), "--dry-run", *overrides)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("error:") and err.count("\n") == 1, err
