"""The manifest stage on real small media (h264 mp4 written with PyAV, int16 wav with soundfile)
laid out as the crop stage leaves them: tsv/wrd format, frame/sample recounts, A/V consistency
failures, failure records, sentencepiece model and fairseq dictionary."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from pipeline.stage import StageContext
from stages.manifest import STAGE, Config, build_manifest, spm_model_path, train_sentencepiece


def write_mp4(path: Path, n_frames: int, fps: int = 25, size: int = 32) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            gray = rng.integers(0, 255, (size, size), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(np.repeat(gray[..., None], 3, axis=2), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_wav(path: Path, n_samples: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(n_samples) / 16000
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16), 16000, subtype="PCM_16")
    return path


def ok_record(crop: Path, item_id: str, split: str, text, n_frames: int, n_samples: int, claimed=None) -> dict:
    video = write_mp4(crop / "video" / f"{item_id}.mp4", n_frames)
    audio = write_wav(crop / "audio" / f"{item_id}.wav", n_samples)
    return {"id": item_id, "split": split, "text": text, "status": "ok",
            "video": video.relative_to(crop).as_posix(), "audio": audio.relative_to(crop).as_posix(),
            "n_frames": claimed or n_frames, "n_samples": n_samples}


def write_results(crop: Path, shards: list[list[dict]]) -> None:
    (crop / "results").mkdir(parents=True, exist_ok=True)
    for k, records in enumerate(shards):
        (crop / "results" / f"{k:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def settings(**kw):
    return OmegaConf.merge(OmegaConf.structured(Config), kw)


@pytest.fixture(scope="module")
def crop_dir(tmp_path_factory):
    crop = tmp_path_factory.mktemp("work") / "crop"
    shard0 = [
        ok_record(crop, "spk1/b", "train", "Good  MORNING everyone", 30, 30 * 640 + 300),
        ok_record(crop, "spk1/a", "train", "Hello World", 25, 16000, claimed=99),  # recount wins
        ok_record(crop, "v1", "valid", "see you later", 20, 20 * 640),
        {"id": "noface", "status": "failed", "reason": "no face detected in 100% of frames"},
        ok_record(crop, "bad_av", "train", "too much audio", 25, 48000),
    ]
    shard1 = [
        ok_record(crop, "c", "train", "a third line of words", 20, 20 * 640 - 500),
        ok_record(crop, "t1", "test", "testing one two", 15, 15 * 640),
        {"id": "gone", "split": "train", "text": "x", "status": "ok", "video": "video/gone.mp4",
         "audio": "audio/gone.wav", "n_frames": 10, "n_samples": 6400},
    ]
    corrupt = ok_record(crop, "corrupt", "train", "broken file", 10, 6400)
    (crop / corrupt["video"]).write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    shard1.append(corrupt)
    write_results(crop, [shard0, shard1])
    return crop


@pytest.fixture(scope="module")
def manifest(crop_dir):
    cfg = OmegaConf.create({"workdir": str(crop_dir.parent), "manifest": OmegaConf.structured(Config)})
    ctx = StageContext(cfg=cfg, workdir=crop_dir.parent)
    shard = STAGE.shards(ctx)[0]
    stats = STAGE.run(ctx, shard)
    for path in STAGE.outputs(ctx, shard):
        assert path.is_file(), path
    return ctx, stats


def test_tsv_format_exactly(manifest, crop_dir):
    ctx, _ = manifest
    out = ctx.stage_dir("manifest")
    root = "../crop"  # the crop dir, relative to the tsv's directory
    assert (out / "train.tsv").read_text() == (
        f"{root}\n"
        "c\tvideo/c.mp4\taudio/c.wav\t20\t12300\n"
        "spk1/a\tvideo/spk1/a.mp4\taudio/spk1/a.wav\t25\t16000\n"
        "spk1/b\tvideo/spk1/b.mp4\taudio/spk1/b.wav\t30\t19500\n"
    )
    assert (out / "valid.tsv").read_text() == f"{root}\nv1\tvideo/v1.mp4\taudio/v1.wav\t20\t12800\n"
    assert (out / "test.tsv").read_text() == f"{root}\nt1\tvideo/t1.mp4\taudio/t1.wav\t15\t9600\n"
    from speechfeat.shards import read_tsv

    for split in ("train", "valid", "test"):
        # the loaders resolve the relative root against the tsv's directory, from any cwd (the
        # fairseq dataset's load_manifest too: the smoke runs train from these manifests)
        tsv_root, rows = read_tsv(out / f"{split}.tsv")
        assert tsv_root == crop_dir.resolve()
        for row in rows:
            assert (tsv_root / row.video).is_file() and (tsv_root / row.audio).is_file()


def test_wrd_lines_match_tsv_rows(manifest):
    ctx, _ = manifest
    out = ctx.stage_dir("manifest")
    assert (out / "train.wrd").read_text() == "a third line of words\nhello world\ngood morning everyone\n"
    assert (out / "valid.wrd").read_text() == "see you later\n"
    assert (out / "test.wrd").read_text() == "testing one two\n"


def test_failure_records(manifest):
    ctx, stats = manifest
    lines = (ctx.stage_dir("manifest") / "failures.jsonl").read_text().splitlines()
    failures = {f["id"]: f for f in map(json.loads, lines)}
    assert sorted(failures) == ["bad_av", "corrupt", "gone", "noface"]
    assert [json.loads(x)["id"] for x in lines] == sorted(failures)
    assert failures["noface"]["stage"] == "crop" and "no face" in failures["noface"]["reason"]
    assert failures["bad_av"]["stage"] == "manifest" and failures["bad_av"]["split"] == "train"
    assert "mismatch" in failures["bad_av"]["reason"] and "48000 samples" in failures["bad_av"]["reason"]
    assert "does not exist" in failures["gone"]["reason"] and "gone.mp4" in failures["gone"]["reason"]
    assert "corrupt.mp4" in failures["corrupt"]["reason"]
    assert stats["failures"] == 4 and stats["counts"] == {"train": 3, "valid": 1, "test": 1}


def test_sentencepiece_model_and_dictionary(manifest):
    import sentencepiece as spm

    ctx, stats = manifest
    out = ctx.stage_dir("manifest")
    model = spm_model_path(ctx)
    assert model is not None and model.is_file() and model.parent == out / "spm"
    size = stats["spm_vocab_size"]
    assert 8 <= size < 1000  # three train lines cannot hold 1000 pieces: clamped, not crashed
    assert model.name == f"spm_unigram{size}.model" and model.with_suffix(".vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == size
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = sp.encode("hello world", out_type=str)
    assert len(pieces) >= 2 and sp.decode(sp.encode("hello world")) == "hello world"
    dictionary = (out / "dict.wrd.txt").read_text().splitlines()
    assert dictionary == (out / "spm" / "dict.wrd.txt").read_text().splitlines()
    assert len(dictionary) == size - 4
    assert dictionary == [f"{sp.id_to_piece(i)} 1" for i in range(4, size)]
    assert not list(out.rglob(".tmp-*"))


def test_requested_vocab_size_when_the_text_allows(tmp_path):
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(3, 8))) for _ in range(150)]
    texts = [" ".join(rng.choice(words, 6)) for _ in range(300)]
    model, size = train_sentencepiece(texts, 40, tmp_path / "spm")
    assert size == 40 and model == tmp_path / "spm" / "spm_unigram40.model"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == 40
    assert sp.decode(sp.encode(texts[0])) == texts[0]


def test_av_tolerance_setting(tmp_path):
    crop = tmp_path / "crop"
    rec = ok_record(crop, "x", "train", None, 20, 20 * 640 + 960)  # 1.5 frames of extra audio
    write_results(crop, [[rec]])
    summary = build_manifest(crop, tmp_path / "m2", settings(av_tolerance_frames=2))
    assert summary["counts"]["train"] == 1 and summary["failures"] == 0
    # no transcripts anywhere: no .wrd, no spm
    assert summary["has_text"] is False and summary["spm_model"] is None
    assert not list((tmp_path / "m2").glob("*.wrd")) and not (tmp_path / "m2" / "spm").exists()
    with pytest.raises(RuntimeError, match="no usable train pairs"):
        build_manifest(crop, tmp_path / "m1", settings(av_tolerance_frames=1))
    failure = json.loads((tmp_path / "m1" / "failures.jsonl").read_text())
    assert failure["id"] == "x" and "+1.5 frames" in failure["reason"]


def test_missing_crop_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the crop stage first"):
        build_manifest(tmp_path / "crop", tmp_path / "m", settings())


def test_bad_results_line_names_the_file(tmp_path):
    crop = tmp_path / "crop"
    (crop / "results").mkdir(parents=True)
    (crop / "results" / "007.jsonl").write_text('{"id": "a", "status": "failed", "reason": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="007.jsonl:2"):
        build_manifest(crop, tmp_path / "m", settings())


def test_validate_rejects_bad_settings(tmp_path):
    from pipeline.errors import ConfigError

    for bad in ({"valid_fraction": 1.5}, {"spm_vocab_size": 2}, {"av_tolerance_frames": -1},
                {"valid_fraction": 0.6, "test_fraction": 0.5}):
        ctx = StageContext(cfg=OmegaConf.create({"manifest": settings(**bad)}), workdir=tmp_path)
        with pytest.raises(ConfigError):
            STAGE.validate(ctx)
    STAGE.validate(StageContext(cfg=OmegaConf.create({"manifest": settings()}), workdir=tmp_path))


def test_parallel_recount_gives_the_same_manifest(manifest, crop_dir, tmp_path, monkeypatch):
    import stages.manifest as manifest_module

    ctx, stats = manifest
    monkeypatch.setattr(manifest_module, "PARALLEL_MIN_PAIRS", 1)
    summary = build_manifest(crop_dir, tmp_path / "par", settings(workers=2))
    serial = ctx.stage_dir("manifest")
    for name in ("train.tsv", "valid.tsv", "test.tsv", "train.wrd", "failures.jsonl"):
        # the root line is the crop dir relative to each manifest dir
        skip = 1 if name.endswith(".tsv") else 0
        assert (tmp_path / "par" / name).read_text().splitlines()[skip:] == \
            (serial / name).read_text().splitlines()[skip:], name
    assert summary["counts"] == stats["counts"]


def test_current_corpus_listing_decides_split_and_text(crop_dir, tmp_path):
    from stages.corpus import Item

    items = [Item(i, f"/corpus/{i}.mp4", split="train", text="Old text") for i in
             ("spk1/a", "spk1/b", "c", "noface", "bad_av", "gone", "corrupt")]
    items += [Item("v1", "/corpus/v1.mp4", split="train", text="A Fixed Transcript"),
              Item("never_cropped", "/corpus/n.mp4", split="valid")]  # t1 is gone from the corpus
    summary = build_manifest(crop_dir, tmp_path / "m", settings(), items)
    out = tmp_path / "m"
    assert [r.split("\t")[0] for r in (out / "train.tsv").read_text().splitlines()[1:]] == ["c", "spk1/a", "spk1/b", "v1"]
    root = os.path.relpath(crop_dir, out)
    assert (out / "valid.tsv").read_text() == (out / "test.tsv").read_text() == f"{root}\n"
    assert (out / "train.wrd").read_text().splitlines()[-1] == "a fixed transcript"
    assert (out / "valid.wrd").read_text() == ""
    assert summary["not_in_corpus"] == 1 and summary["not_cropped"] == 1
    assert summary["counts"] == {"train": 4, "valid": 0, "test": 0}


def test_rerun_replaces_text_outputs_of_an_earlier_run(crop_dir, tmp_path):
    out = tmp_path / "m"
    first = build_manifest(crop_dir, out, settings(spm_vocab_size=27))
    assert first["spm_model"] == "spm/spm_unigram27.model"
    second = build_manifest(crop_dir, out, settings(spm_vocab_size=24))
    assert sorted(p.name for p in (out / "spm").iterdir()) == ["dict.wrd.txt", "spm_unigram24.model",
                                                              "spm_unigram24.vocab"]
    assert second["spm_vocab_size"] == 24 and len((out / "dict.wrd.txt").read_text().splitlines()) == 20


def test_spm_model_path_from_a_per_iteration_context(manifest):
    ctx, stats = manifest
    later = ctx.with_iteration(3)  # e.g. the finetune or features stage of iteration 3
    assert spm_model_path(later) == ctx.stage_dir("manifest") / stats["spm_model"]


def test_counts_come_from_the_crop_records_checked_by_size(tmp_path):
    """At scale nothing is decoded: the record's counts are used when both files have the sizes
    the crop stage recorded; a file changed or gone since is a failure; verify=decode recounts."""
    crop = tmp_path / "crop"
    recs = []
    for item_id, frames in (("same", 30), ("resized", 20), ("gone", 20)):
        rec = ok_record(crop, item_id, "train", None, frames, frames * 640, claimed=25 if item_id == "same" else None)
        rec["video_bytes"] = (crop / rec["video"]).stat().st_size
        rec["audio_bytes"] = (crop / rec["audio"]).stat().st_size
        rec["n_samples"] = 25 * 640 if item_id == "same" else rec["n_samples"]
        recs.append(rec)
    with open(crop / recs[1]["video"], "ab") as f:
        f.write(b"\0" * 10)
    (crop / recs[2]["audio"]).unlink()
    write_results(crop, [recs])
    summary = build_manifest(crop, tmp_path / "m", settings())
    rows = (tmp_path / "m" / "train.tsv").read_text().splitlines()[1:]
    assert rows == ["same\tvideo/same.mp4\taudio/same.wav\t25\t16000"]  # the record's counts: not decoded
    failures = {f["id"]: f["reason"] for f in map(json.loads, (tmp_path / "m" / "failures.jsonl").read_text().splitlines())}
    assert "the crop stage wrote" in failures["resized"] and "does not exist" in failures["gone"]
    assert summary["failures"] == 2
    build_manifest(crop, tmp_path / "d", settings(verify="decode"))
    # recounted from the files (30 frames and 19200 samples, not the record's 25 and 16000), and
    # the grown "resized" still decodes
    assert (tmp_path / "d" / "train.tsv").read_text().splitlines()[1:] == [
        "resized\tvideo/resized.mp4\taudio/resized.wav\t20\t12800",
        "same\tvideo/same.mp4\taudio/same.wav\t30\t19200"]
