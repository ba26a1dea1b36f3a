"""Step fingerprints with the real stages (pipeline/fingerprint.py, pipeline/changes.py,
pipeline/provenance.py): every settings field classified; a changed setting shown (old -> new, what
it redoes), refused in one line, redone with --redo-changed to the bytes of a clean run; a resource
key changes nothing; other versions are a note; a work dir made before fingerprints is adopted; a
setting that does nothing is refused; provenance.json beside every output.

The work dir: crop .. labels of iteration 1 on 8 clips of the sample corpus (debug executor,
~20 s once per module); each test works on its own copy."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

CLIPS = ["pexels_langer/00", "pexels_langer/01", "pexels_langer/02", "pexels_langer/03", "pexels_langer/04",
         "pexels_langer/05", "pexels_langer/flip_00", "pexels_langer/flip_01"]
FIRST = ["crop", "manifest", "features", "kmeans", "labels"]


@pytest.fixture(autouse=True)
def no_run_report(monkeypatch):
    """The run report written after each launch (tested in tests/report) is left out here."""
    import report

    monkeypatch.setattr(report, "at_end_of_launch", lambda *args, **kwargs: [])


def launch(work: Path, *argv) -> int:
    import launch as launcher

    if argv and argv[0] == "status":
        return launcher.main([*argv, "--workdir", str(work)])
    return launcher.main(["--workdir", str(work), "--cluster", "debug", "--corpus", str(work.parent / "corpus"),
                          *argv, "iterations=1"])


def submitted(out: str) -> dict:
    """step -> shards submitted, from the launch's lines."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\[(.+?)\] submitting (\d+)/\d+ shard", out, re.M)}


def snapshot(work: Path) -> dict:
    """Every output and step record of the work dir, not the launch's own bookkeeping (its lock,
    config, run plan, submitit folders, report): path -> bytes."""
    out = {}
    for p in sorted(work.rglob("*")):
        rel = p.relative_to(work).as_posix()
        if p.is_file() and not rel.startswith("report/") and (not rel.startswith(".pipeline/")
                                                              or rel.startswith(".pipeline/state/")):
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def small_run(sample_corpus, tmp_path_factory) -> Path:
    """crop, manifest, features, kmeans and labels (iteration 1) of 8 clips, K = 20."""
    import launch as launcher
    import report

    root = tmp_path_factory.mktemp("fingerprint")
    corpus = root / "corpus"
    for clip in CLIPS:
        for ext in (".mp4", ".txt"):
            (corpus / clip).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_corpus / f"{clip}{ext}", corpus / f"{clip}{ext}")
    (corpus / "splits").mkdir()
    (corpus / "splits" / "valid.lst").write_text("pexels_langer/04\n")
    (corpus / "splits" / "test.lst").write_text("pexels_langer/05\n")
    work = root / "work"
    keep = report.at_end_of_launch
    report.at_end_of_launch = lambda *args, **kwargs: []
    try:
        for stage in FIRST:
            rc = launcher.main(["--stage", stage, "--iteration", "1", "--workdir", str(work), "--cluster", "debug",
                                "--corpus", str(corpus), "iterations=1"])
            assert rc == 0, stage
    finally:
        report.at_end_of_launch = keep
    return work


@pytest.fixture
def work(small_run, tmp_path) -> Path:
    shutil.copytree(small_run.parent / "corpus", tmp_path / "corpus")
    shutil.copytree(small_run, tmp_path / "work", ignore=shutil.ignore_patterns("submitit", "lock"))
    return tmp_path / "work"


# --- classification ------------------------------------------------------------------------------
def test_every_settings_field_is_classified():
    from pipeline import fingerprint as fp
    from pipeline.config import ClusterConfig, EngineConfig
    from stages import config_sections

    sections = {"(engine)": EngineConfig, "cluster": ClusterConfig, **config_sections()}
    assert set(sections) >= {"crop", "manifest", "noise", "features", "kmeans", "labels", "train", "finetune",
                             "units", "schedule"}
    counted = 0
    for name, cls in sections.items():
        assert fp.unclassified(cls) == [], name
        for f in dataclasses.fields(cls):
            assert fp.classes_of(cls).kind(f.name) in ("output", "per_iteration", "ignored")
            counted += 1
    assert counted > 100
    # a field nobody classified is refused where it is declared
    with pytest.raises(TypeError, match="not classified: threads"):
        @fp.classify(output=("k",))
        @dataclasses.dataclass
        class Section:
            k: int = 1
            threads: int = 2
    with pytest.raises(TypeError, match="need a reason"):
        fp.classify(ignored={"k": ""})(dataclasses.make_dataclass("S", [("k", int, 1)]))


def test_resolved_settings_leave_out_what_cannot_change_outputs():
    from pipeline.config import load_config
    from pipeline.stage import StageContext
    from stages import config_sections, get_stage

    cfg = load_config(config_sections(), "smoke", "debug", ["kmeans.threads=7", "features.keep=true"], {})
    ctx = StageContext(cfg=cfg, workdir=Path("/nonexistent"), iteration=2)
    km = get_stage("kmeans").settings(ctx)
    assert km["kmeans.n_clusters"] == 20  # null = the schedule's K for iteration 2, resolved
    assert "kmeans.threads" not in km and "kmeans.device" not in km
    feats = get_stage("features").settings(ctx)
    assert "features.keep" not in feats and "features.device" not in feats
    assert feats["schedule.iterations[2].layer"] == 1  # only iteration 2's entry of the schedule
    assert not any(k.startswith("schedule.iterations[1]") for k in feats)
    assert get_stage("train").settings(ctx)["train.max_update[2]"] == 6


UNITS_ON = ["units.enabled=true", "units.n_clusters=10", "units.layer=1", "units.iteration=1"]


STAGE_CASES = [  # stage, a setting that changes its outputs, its key there, a setting that cannot
    ("crop", "crop.mode=reference", "crop.mode", "crop.frame_cache_mb=64"),
    ("crop", "manifest.max_segment_seconds=5", "manifest.max_segment_seconds", "cluster.stages.crop.mem_gb=9"),
    ("manifest", "manifest.spm_vocab_size=100", "manifest.spm_vocab_size", "manifest.workers=3"),
    ("noise", "noise.seed=5", "noise.seed", "noise.max_failure_rate=0.5"),
    ("features", "features.dtype=float16", "features.dtype", "features.batch_frames=1000"),
    ("kmeans", "kmeans.n_clusters=7", "kmeans.n_clusters", "kmeans.device=cuda"),
    ("labels", "features.splits=[train]", "features.splits", "labels.chunk_frames=100"),
    ("train", "train.max_update=4", "train.max_update[1]", "train.master_port=1234"),
    ("finetune", "finetune.beam=2", "finetune.beam", "finetune.decode_max_tokens=100"),
    ("units_kmeans", "units.kmeans_seed=3", "units.kmeans_seed", "units.torch_threads=1"),
    ("units", "units.layer=2", "units.layer", "units.nshard=3"),
]


def test_every_stage_has_a_settings_case():
    from stages import STAGE_ORDER

    assert {case[0] for case in STAGE_CASES} == set(STAGE_ORDER)


@pytest.mark.parametrize("stage, change, key, ignored", STAGE_CASES)
def test_each_stage_sees_its_output_settings_and_not_the_others(stage, change, key, ignored, tmp_path):
    """For every stage: one key that changes its outputs is in its settings (a changed step), one
    that cannot is not."""
    from pipeline import fingerprint as fp
    from pipeline.config import load_config
    from pipeline.stage import StageContext
    from stages import config_sections, get_stage

    def settings(*extra):
        cfg = load_config(config_sections(), "smoke", "debug", [*UNITS_ON, *extra],
                          {"workdir": str(tmp_path), "corpus": str(tmp_path)})
        st = get_stage(stage)
        return st.settings(StageContext(cfg=cfg, workdir=tmp_path, iteration=1 if st.per_iteration else None))

    base = settings()
    assert [d[0] for d in fp.differences(base, settings(change))] == [key]
    assert fp.differences(base, settings(ignored)) == []


# --- a changed setting ---------------------------------------------------------------------------
def test_changed_k_shown_refused_and_redone_like_a_clean_run(work, capsys):
    kmeans_dir, labels_dir = work / "iter1" / "kmeans", work / "iter1" / "labels"
    assert launch(work, "--dry-run", "kmeans.n_clusters=7") == 0
    out = capsys.readouterr().out
    assert "kmeans (iteration 1): changed kmeans.n_clusters 20 -> 7: redoes kmeans, labels" in out
    assert re.search(r"kmeans \(iteration 1\): changed .* \(est\. [<\d.]+ CPU-h, [<\d.]+ GPU-h\)", out)
    assert "a launch without --redo-changed refuses" in out
    assert "crop:" not in out.split("settings and versions")[1].split("\n\n")[0]  # nothing else changed

    # status: compared with the last launch's settings (as recorded), or with settings given to it
    assert launch(work, "status") == 0
    assert "settings: every step as recorded (compared with the last launch's settings)" in capsys.readouterr().out
    assert launch(work, "status", "kmeans.n_clusters=7") == 0
    out = capsys.readouterr().out
    assert "settings compared with the last launch's settings, kmeans.n_clusters=7:" in out
    assert "  kmeans (iteration 1): changed kmeans.n_clusters 20 -> 7: redoes kmeans, labels" in out

    before = snapshot(work)
    assert launch(work, "--stage", "kmeans", "--iteration", "1", "kmeans.n_clusters=7") == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("error: kmeans (iteration 1) ")
    assert "kmeans.n_clusters 20 -> 7" in cap.err and "restore kmeans.n_clusters=20" in cap.err
    assert "--redo-changed" in cap.err
    assert snapshot(work) == before  # refused before anything is written
    # a step after it refuses too (it reads the changed model), naming the way on
    assert launch(work, "--stage", "labels", "--iteration", "1", "kmeans.n_clusters=7") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reads kmeans (iteration 1)" in err and "--redo-changed" in err

    # --redo-changed: the changed step, then what reads it; nothing upstream
    assert launch(work, "--stage", "kmeans", "--iteration", "1", "--redo-changed", "kmeans.n_clusters=7") == 0
    out = capsys.readouterr().out
    assert submitted(out) == {"kmeans (iteration 1)": 1}
    assert "changed kmeans.n_clusters 20 -> 7; every shard runs again" in out
    assert launch(work, "--stage", "labels", "--iteration", "1", "kmeans.n_clusters=7") == 0
    assert submitted(capsys.readouterr().out) == {"labels (iteration 1)": 2}
    from speechfeat.kmeans import load_centroids

    assert load_centroids(kmeans_dir / "kmeans.joblib").shape[0] == 7
    # now the recorded settings are the new ones: the same launch has nothing to do, the old K is a change
    assert launch(work, "--stage", "labels", "--iteration", "1", "kmeans.n_clusters=7") == 0
    assert submitted(capsys.readouterr().out) == {}
    assert launch(work, "--stage", "kmeans", "--iteration", "1") == 2
    assert "kmeans.n_clusters 7 -> 20" in capsys.readouterr().err

    # a clean run of those steps with K = 7 on the same inputs gives the same bytes
    clean = work.parent / "clean"
    shutil.copytree(work, clean)
    for stage in ("kmeans", "labels"):
        shutil.rmtree(clean / "iter1" / stage)
        shutil.rmtree(clean / ".pipeline" / "state" / "iter1" / stage)
    for stage in ("kmeans", "labels"):
        assert launch(clean, "--stage", stage, "--iteration", "1", "kmeans.n_clusters=7") == 0
    capsys.readouterr()
    for d in ("kmeans", "labels"):
        mine = {p.name: p.read_bytes() for p in (work / "iter1" / d).iterdir() if p.is_file()}
        theirs = {p.name: p.read_bytes() for p in (clean / "iter1" / d).iterdir() if p.is_file()}
        mine.pop("provenance.json"), theirs.pop("provenance.json")  # hosts and times: not byte-identical
        assert mine == theirs, d
    assert {"train.km", "valid.km"} <= set(p.name for p in labels_dir.iterdir())


def test_crop_change_redoes_everything_after_it(work, capsys):
    assert launch(work, "--dry-run", "crop.crf=20") == 0
    out = capsys.readouterr().out
    assert "crop: changed crop.crf 18 -> 20: redoes crop, manifest, iteration 1" in out
    assert launch(work, "--stage", "manifest", "crop.crf=20") == 2
    assert "reads crop, which was made with other settings (crop.crf 18 -> 20)" in capsys.readouterr().err


def test_resource_keys_change_nothing(work, capsys):
    assert launch(work, "--stage", "crop") == 0  # the work dir's copy has its corpus elsewhere: noted once
    before = snapshot(work)
    assert launch(work, "--dry-run", "cluster.stages.crop.timeout_min=30", "kmeans.threads=1",
                  "features.keep=true") == 0
    out = capsys.readouterr().out
    assert "changed" not in out and "settings and versions since" not in out
    assert launch(work, "--stage", "crop", "cluster.stages.crop.timeout_min=30", "cluster.stages.crop.mem_gb=3") == 0
    out = capsys.readouterr().out
    assert submitted(out) == {} and "[crop] complete (2 shards), nothing to do" in out
    assert snapshot(work) == before


def test_other_versions_are_a_note(work, capsys):
    record = work / ".pipeline" / "state" / "iter1" / "kmeans" / "_fingerprint.json"
    rec = json.loads(record.read_text())
    rec["versions"]["numpy"] = "1.0.0"
    record.write_text(json.dumps(rec))
    assert launch(work, "--dry-run") == 0
    out = capsys.readouterr().out
    assert re.search(r"note: made with other versions: numpy 1\.0\.0 -> \S+ \(kmeans \(iteration 1\)\)", out)
    assert "refuses" not in out
    assert launch(work, "--stage", "kmeans", "--iteration", "1") == 0
    out = capsys.readouterr().out
    assert submitted(out) == {} and "note: made with other versions" in out


def test_max_update_raised_continues_lowered_is_a_change(work):
    """Raising train.max_update keeps its meaning (training continues): a note, no refusal;
    lowering it is a change."""
    from launch import APP
    from pipeline import changes
    from pipeline.cli import parse_args, plan

    common = ["--workdir", str(work), "--cluster", "debug", "--corpus", str(work.parent / "corpus"), "--stage",
              "train", "--iteration", "1", "--dry-run", "iterations=1"]
    args = parse_args(APP, common)
    _cfg, pipe, _steps = plan(APP, args, dry_run=True, compute_shards=False)
    train = pipe.stages["train"]
    pipe.store.write_fingerprint("train", 1, changes.make_record(pipe, train, 1))  # as if it trained to 6
    for value, accepted in (("8", True), ("4", False)):
        args = parse_args(APP, [*common, f"train.max_update={value}"])
        _cfg, pipe, _steps = plan(APP, args, dry_run=True, compute_shards=False)
        change = pipe.comparison.changes[("train", 1)]
        if accepted:
            assert not change.changed and change.accepted[0][:3] == ("train.max_update[1]", 6, 8)
            assert pipe.comparison.refusal is None
            assert "training continues" in "\n".join(pipe.comparison.lines())
        else:
            assert change.changed == [("train.max_update[1]", 6, 4)]
            assert "train.max_update[1] 6 -> 4" in pipe.comparison.refusal


# --- adopting a work dir made before fingerprints ------------------------------------------------
def test_work_dir_without_fingerprints_is_adopted(work, capsys):
    for p in list(work.rglob("_fingerprint.json")) + list(work.rglob("provenance.json")):
        p.unlink()
    assert launch(work, "--dry-run") == 0
    assert "5 step(s) made before settings were recorded" in capsys.readouterr().out
    assert launch(work, "--stage", "labels", "--iteration", "1") == 0
    out = capsys.readouterr().out
    assert submitted(out) == {}
    adopted = [line for line in out.splitlines() if line.startswith("adopted ")]
    assert len(adopted) == 1 and "adopted 5 step(s)" in adopted[0]
    prov = json.loads((work / "iter1" / "kmeans" / "provenance.json").read_text())
    assert "made before settings were recorded" in prov["adopted"] and prov["settings"]["kmeans.n_clusters"] == 20
    # recorded: the next launch says nothing of it, and a change is a change
    assert launch(work, "--stage", "labels", "--iteration", "1") == 0
    assert "adopted" not in capsys.readouterr().out
    assert launch(work, "--stage", "kmeans", "--iteration", "1", "kmeans.n_clusters=7") == 2
    assert "kmeans.n_clusters 20 -> 7" in capsys.readouterr().err


# --- settings that do nothing --------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("cluster.stages.crop.nodes=2", "cluster.stages.crop.nodes=2 does nothing: crop runs one task per shard"),
    ("cluster.stages.labels.tasks_per_node=4", "cluster.stages.labels.tasks_per_node=4 does nothing"),
    ("cluster.stages.cropp.mem_gb=4", "cluster.stages.cropp: there is no stage 'cropp'"),
    ("train.max_update=[6,8,10]", "train.max_update has 3 entries but this run has 1 iteration(s): entries 2-3"),
    ("units.layer=3", "units.layer=3 does nothing: units_kmeans and units are not part of this run"),
    ("train.noise.snr=5", "train.noise.snr=5 does nothing: train.noise.prob is 0 (no noise in training); remove it"),
    ("finetune.noise.eval_seed=3", "finetune.noise.eval_seed=3 does nothing: finetune.noise.eval_snrs is empty"),
])
def test_a_setting_that_does_nothing_is_refused(work, capsys, override, message):
    before = snapshot(work)
    assert launch(work, "--stage", "crop", override) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert snapshot(work) == before
    assert launch(work, "--dry-run", override) == 2  # a dry run says it too
    assert message in capsys.readouterr().err


def test_noise_settings_count_only_where_they_do_something(tmp_path):
    """A noise block's settings are part of a step's identity only where it mixes noise (train: in
    the iterations of train.noise.iterations) or decodes under noise (finetune); elsewhere they do
    nothing, and one given on the command line while it does nothing anywhere is refused."""
    from pipeline.config import load_config
    from pipeline.stage import StageContext
    from stages import config_sections, get_stage

    def settings(stage, iteration, *overrides):
        cfg = load_config(config_sections(), "smoke", "local", ["iterations=2", *overrides],
                          {"workdir": str(tmp_path / "work"), "corpus": str(tmp_path)})
        ctx = StageContext(cfg=cfg, workdir=Path(cfg.workdir), iteration=iteration)
        return get_stage(stage).settings(ctx), get_stage(stage).inert_settings(ctx)

    now, inert = settings("finetune", None)
    assert not any(k.startswith("finetune.noise.") and k not in ("finetune.noise.prob", "finetune.noise.eval_snrs")
                   for k in now), now
    assert inert["finetune.noise.dir"].endswith("and finetune.noise.eval_snrs is empty")
    now, inert = settings("finetune", None, "finetune.noise.eval_snrs=[0]")
    assert now["finetune.noise.eval_seed"] == 0 and "finetune.noise.dir" in now and "finetune.noise.snr" not in now
    now, _ = settings("finetune", None, "finetune.noise.prob=0.5", "finetune.noise.snr=5")
    assert now["finetune.noise.snr"] == "5" and "finetune.noise.eval_seed" not in now
    # train: iteration 1 without noise, iteration 2 with it
    two = ["train.noise.prob=0.5", "train.noise.iterations=[2]", "train.noise.snr=5"]
    first, inert = settings("train", 1, *two)
    assert first["train.noise[1]"] == "off" and inert["train.noise.snr"] == "iteration 1 is not in train.noise.iterations"
    second, inert = settings("train", 2, *two)
    assert second["train.noise.snr"] == "5" and inert == {}


# --- provenance ----------------------------------------------------------------------------------
def test_provenance_beside_every_output(work):
    dirs = {"crop": work / "crop", "manifest": work / "manifest", "features (iteration 1)": work / "iter1/features",
            "kmeans (iteration 1)": work / "iter1/kmeans", "labels (iteration 1)": work / "iter1/labels"}
    for step, d in dirs.items():
        prov = json.loads((d / "provenance.json").read_text())
        record = json.loads((work / ".pipeline" / "state" / prov["state"].split("state/", 1)[1]
                             / "_fingerprint.json").read_text())
        assert prov["step"] == step and prov["fingerprint"] == record["fingerprint"]
        assert prov["settings"] == record["settings"] and prov["versions"]
        assert prov["project"]["commit"] and prov["host"] and prov["started"] and prov["finished"]
        assert prov["command"][0] == "launch.py" and "--stage" in prov["command"]
    labels = json.loads((dirs["labels (iteration 1)"] / "provenance.json").read_text())
    assert labels["inputs"]["kmeans (iteration 1)"]["provenance"] == "iter1/kmeans/provenance.json"
    kmeans = json.loads((dirs["kmeans (iteration 1)"] / "provenance.json").read_text())
    assert labels["inputs"]["kmeans (iteration 1)"]["fingerprint"] == kmeans["fingerprint"]
    assert kmeans["settings"]["kmeans.n_clusters"] == 20 and "kmeans.threads" not in kmeans["settings"]
    assert "numpy" in kmeans["versions"] and "dlib" in json.loads((dirs["crop"] / "provenance.json").read_text())["versions"]


def test_report_links_provenance_and_marks_changed_steps(work, capsys):
    """The run report: per step its settings digest linked to its provenance.json; a step whose
    settings differ from the last launch's marked changed (and listed under 'Needs attention')."""
    from report.build import build_report

    # features does not read kmeans.n_clusters: it runs (nothing to do), k-means stays as it is
    assert launch(work, "--stage", "features", "--iteration", "1", "kmeans.n_clusters=9") == 0
    capsys.readouterr()
    build_report(work)
    page = (work / "report" / "index.html").read_text()
    kmeans = json.loads((work / "iter1" / "kmeans" / "provenance.json").read_text())
    assert f'<a href="../iter1/kmeans/provenance.json" class="path">{kmeans["settings_digest"]}</a>' in page
    assert page.count('class="badge failed" title="kmeans.n_clusters 20 -&gt; 9">changed</span>') == 1
    assert "kmeans (iteration 1) was made with other settings than the last launch" in page
    # once launched with the recorded settings again, nothing is marked
    assert launch(work, "--stage", "features", "--iteration", "1") == 0
    build_report(work)
    assert ">changed</span>" not in (work / "report" / "index.html").read_text()


def test_a_complete_run_explains_its_checkpoints(smoke_run):
    """The session's complete smoke run (two iterations, fine-tuning): every step's output dir and
    the final checkpoint's and the fine-tuned model's directories hold provenance.json, each step
    reading the one before; the report links them."""
    steps = {"crop": "crop", "manifest": "manifest", "finetune": "finetune", "finetune (checkpoints)": "finetune/checkpoints"}
    for it in (1, 2):
        for stage in ("features", "kmeans", "labels", "train"):
            steps[f"{stage} (iteration {it})"] = f"iter{it}/{stage}"
        steps[f"train (iteration {it}) (checkpoints)"] = f"iter{it}/train/checkpoints"
    docs = {name: json.loads((smoke_run / d / "provenance.json").read_text()) for name, d in steps.items()}
    assert docs["train (iteration 2) (checkpoints)"] == docs["train (iteration 2)"]
    assert (smoke_run / "finetune" / "checkpoints" / "checkpoint_best.pt").is_file() or \
        any((smoke_run / "finetune" / "checkpoints").glob("*.pt"))
    train2 = docs["train (iteration 2)"]
    assert set(train2["inputs"]) == {"labels (iteration 2)"}
    assert train2["inputs"]["labels (iteration 2)"]["fingerprint"] == docs["labels (iteration 2)"]["fingerprint"]
    assert train2["settings"]["train.max_update[2]"] == 6 and {"torch", "fairseq"} <= set(train2["versions"])
    assert "features (iteration 2)" not in docs["kmeans (iteration 1)"]["inputs"]
    assert "train (iteration 1)" in docs["features (iteration 2)"]["inputs"]
    assert docs["finetune"]["inputs"].keys() >= {"train (iteration 2)", "manifest"}
    page = (smoke_run / "report" / "index.html").read_text()
    assert '<a href="../iter2/train/provenance.json" class="path">' in page
