"""The noise stage on the sample corpus (the session smoke run's manifest) and synthetic noise
folders: babble and single-talker speech from the corpus splits, user recordings in any format
and rate as 16 kHz mono pieces, the lists the dataset reads, failure records, byte-identical
rebuilds, resuming one shard, the frozen plan, a dry run that writes nothing."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from noise_helpers import copy_steps, launch_here, noise_args
from stages.noise import SPLITS, speaker_of, utterance_pools


def tree_digest(root: Path) -> dict:
    """sha256 of every output file of the noise stage (not the plan: it names the manifest's
    absolute paths; not provenance.json: the command, host and times of the launch)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "plan" not in p.parts and p.name != "provenance.json"}


def read_list(path: Path):
    """[(wav path, talkers)] of a noise list."""
    out = []
    for line in path.read_text().splitlines():
        wav, *talkers = line.split("\t")
        out.append((path.parent / wav, talkers))
    return out


def manifest_ids(work: Path) -> dict:
    return {s: {line.split("\t")[0] for line in (work / "manifest" / f"{s}.tsv").read_text().splitlines()[1:]}
            for s in SPLITS}


def test_noise_lists_and_clips(noise_work):
    noise = noise_work / "noise"
    summary = json.loads((noise / "summary.json").read_text())
    cats = summary["categories"]
    assert sorted(cats) == ["babble", "hum", "music", "noise", "speech"]
    assert {s: cats["babble"][s]["clips"] for s in SPLITS} == {"train": 4, "valid": 2, "test": 2}
    # music: three files, one per split; hum: one 35 s recording split in time (2 + 1 + 1 pieces);
    # noise: broken.wav fails, short.wav is skipped
    # (12, 11 and 13 s: pieces of 10 s, and the last one from 3 s)
    assert sum(cats["music"][s]["clips"] for s in SPLITS) == 4 and all(cats["music"][s]["clips"] for s in SPLITS)
    assert {s: cats["hum"][s]["clips"] for s in SPLITS} == {"train": 2, "valid": 1, "test": 1}
    failures = [json.loads(line) for line in (noise / "failures.jsonl").read_text().splitlines()]
    assert [Path(f["source"]).name for f in failures] == ["broken.wav"]
    assert "broken.wav" in failures[0]["reason"] and summary["skipped"] == 1

    ids = manifest_ids(noise_work)
    listed_everywhere = set()
    for split in SPLITS:
        combined = {p for p, _ in read_list(noise / f"{split}.tsv")}
        per_category = set()
        for category in cats:
            clips = read_list(noise / category / f"{split}.tsv")
            assert len(clips) == cats[category][split]["clips"]
            for wav, talkers in clips:
                per_category.add(wav)
                data, rate = sf.read(str(wav), dtype="int16")
                info = sf.info(str(wav))
                assert rate == 16000 and data.ndim == 1 and info.subtype == "PCM_16"
                if category in ("babble", "speech") and "corpus" in wav.parts:
                    assert len(data) == 4 * 16000
                    assert talkers  # the corpus talkers in the clip
                else:
                    assert 3 * 16000 <= len(data) <= 10 * 16000 and not talkers
        assert {p.resolve() for p in per_category} == {p.resolve() for p in combined}
        listed_everywhere |= combined
    assert len(listed_everywhere) == sum(v["clips"] for c in cats.values() for v in c.values())

    # corpus clips are made of their own split's utterances only; the lists name their talkers as
    # the dataset reads an utterance's talker
    from avhubert.dataset import talker_key

    for shard in (noise / "results").glob("corpus-*.jsonl"):
        for rec in map(json.loads, shard.read_text().splitlines()):
            assert set(rec["utterances"]) <= ids[rec["split"]], rec
            listed = dict((p.relative_to(noise).as_posix(), t) for p, t in read_list(noise / f"{rec['split']}.tsv"))
            assert sorted(listed[rec["path"]]) == sorted({talker_key(u) for u in rec["utterances"]})
            talkers = 4 if rec["category"] == "babble" else 1
            assert len(rec["utterances"]) >= min(talkers, len(ids[rec["split"]]))  # distinct while they last


def test_the_dataset_reads_the_lists(noise_work, tmp_path):
    """Each category's valid list feeds the fairseq task (noise_categories), and the audio changes."""
    import os

    from noise_helpers import noise_task

    data = noise_work / "manifest"
    # the smoke manifest's words are not frame labels: give the task one label per frame
    root, *rows = (data / "valid.tsv").read_text().splitlines()
    root = str(data / root)  # the manifest's root is relative to its own directory (../crop)
    (tmp_path / "valid.tsv").write_text("\n".join([root, *rows]) + "\n")
    (tmp_path / "valid.km").write_text("".join(" ".join(["0"] * int(r.split("\t")[3])) + "\n" for r in rows))
    (tmp_path / "dict.km.txt").write_text("0 1\n")
    clean = noise_task(tmp_path)
    clean.load_dataset("valid")
    reference = clean.dataset("valid")[0]["audio_source"]
    summary = json.loads((noise_work / "noise" / "summary.json").read_text())["categories"]
    with_valid = [c for c, per in summary.items() if per["valid"]["clips"]]
    assert {"babble", "speech", "music", "hum"} <= set(with_valid)
    for category in with_valid:
        task = noise_task(tmp_path, noise_wav=str(noise_work / "noise"), noise_prob=1.0, noise_snr="0",
                          noise_categories=[category], noise_seed=0)
        task.load_dataset("valid")
        ds = task.dataset("valid")
        assert all(os.path.isfile(p) for clips in ds.noise_lists for p, _ in clips)
        noisy = ds[0]["audio_source"]
        assert noisy.shape == reference.shape and float((noisy - reference).abs().mean()) > 0.1, category


def test_speakers_of_evaluation_noise_stay_out_of_training_noise(tmp_path):
    """lrs3/vox2 ids name the speaker: train noise leaves out valid and test speakers, valid noise
    test speakers."""
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    rows = {"train": ["pretrain/spkA/1", "pretrain/spkB/1", "trainval/spkV/2"],
            "valid": ["trainval/spkV/1", "trainval/spkT/9"], "test": ["test/spkT/1"]}
    for split, ids in rows.items():
        lines = [str(tmp_path)] + [f"{i}\tv/{i}.mp4\ta/{i}.wav\t50\t32000" for i in ids]
        (manifest / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    pools = {s: [r[0] for r in rows] for s, rows in utterance_pools(manifest, "lrs3").items()}
    assert pools == {"train": ["pretrain/spkA/1", "pretrain/spkB/1"], "valid": ["trainval/spkV/1"],
                     "test": ["test/spkT/1"]}
    assert speaker_of("dev/id001/clipX/00001", "vox2") == "id001" and speaker_of("a/b/c", "plain") is None
    plain = {s: [r[0] for r in rows] for s, rows in utterance_pools(manifest, "plain").items()}
    assert plain == rows


def test_rebuild_is_byte_identical_resumes_and_guards_its_plan(noise_work, smoke_run, sample_corpus, noise_inputs,
                                                             tmp_path):
    work = copy_steps(smoke_run, tmp_path / "work", "crop", "manifest")
    args = ["--stage", "noise", *noise_args(noise_inputs)]
    first = launch_here(work, sample_corpus, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert tree_digest(work / "noise") == tree_digest(noise_work / "noise")

    # a killed shard: its result and a clip gone, its marker gone -> only it runs, same bytes
    before = tree_digest(work / "noise")
    (work / "noise" / "results" / "corpus-00001.jsonl").unlink()
    next((work / "noise" / "babble" / "corpus").rglob("*.wav")).unlink()
    (work / ".pipeline" / "state" / "once" / "noise" / "corpus-00001.done.json").unlink()
    again = launch_here(work, sample_corpus, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitting 1/" in again.stdout
    assert tree_digest(work / "noise") == before

    # other settings: refused (one error line) until --redo-changed rebuilds
    changed = [a.replace("train: 4", "train: 2") for a in args]
    refused = launch_here(work, sample_corpus, *changed)
    assert refused.returncode == 2 and "noise.corpus_clips" in refused.stderr and "--redo-changed" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1
    rebuilt = launch_here(work, sample_corpus, *changed, "--redo-changed")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    summary = json.loads((work / "noise" / "summary.json").read_text())
    assert summary["categories"]["babble"]["train"]["clips"] == 2
    assert len(list((work / "noise" / "babble" / "corpus" / "train").glob("*.wav"))) == 2  # no stale clips


def test_dry_run_plans_without_writing(smoke_run, sample_corpus, noise_inputs, tmp_path):
    work = copy_steps(smoke_run, tmp_path / "work", "crop", "manifest")
    proc = launch_here(work, sample_corpus, "--stage", "noise", "--dry-run", *noise_args(noise_inputs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 2 categories x (4 + 2 + 2) clips, 11 recordings: 6 + 3 shards
    assert "plan: 16 corpus clips and 11 noise files in 9 shards" in proc.stdout
    assert "shards: 9 to run / 9" in proc.stdout
    assert not (work / "noise").exists()


def test_a_full_disk_fails_the_shard_a_bad_file_is_recorded(noise_work, sample_corpus, noise_inputs, tmp_path,
                                                           monkeypatch):
    """In a shard, an undecodable recording is a failure record, but a full disk while writing is
    the job's problem: the shard fails (InfrastructureError) and records nothing."""
    import errno
    import shutil

    from pipeline.config import load_config
    from pipeline.errors import InfrastructureError
    from pipeline.stage import StageContext
    from stages import config_sections
    from stages import noise as noise_stage

    work = tmp_path / "work"
    shutil.copytree(noise_work / "noise" / "plan", work / "noise" / "plan")
    cfg = load_config(config_sections(), "smoke", "debug", noise_args(noise_inputs),
                      {"workdir": str(work), "corpus": str(sample_corpus)})
    ctx = StageContext(cfg=cfg, workdir=work)
    shard = next(s for s in noise_stage.STAGE.shards(ctx) if s.key == "files-00001")
    jobs = json.loads((work / "noise" / "plan" / "files-00001.json").read_text())["jobs"]
    assert any(j["source"].endswith("broken.wav") for j in jobs)  # the shard holding the broken file
    stats = noise_stage.STAGE.run(ctx, shard)
    records = [json.loads(line) for line in (work / "noise" / "results" / "files-00001.jsonl").read_text().splitlines()]
    assert stats["failed"] == 1 and [r["source"].rsplit("/", 1)[-1] for r in records if r["status"] == "failed"] == ["broken.wav"]

    (work / "noise" / "results" / "files-00001.jsonl").unlink()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(work / "noise" / "x.wav"))

    monkeypatch.setattr(noise_stage, "_write_wav", full_disk)
    with pytest.raises(InfrastructureError, match="disk full"):
        noise_stage.STAGE.run(ctx, shard)
    assert not (work / "noise" / "results" / "files-00001.jsonl").exists()
