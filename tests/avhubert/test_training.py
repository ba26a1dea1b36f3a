"""Real fairseq training of a tiny AV-HuBERT on generated clips (CPU): the fairseq-hydra-train CLI,
resume through avhubert.train_entry, and a 2-rank gloo run (one process per rank)."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "avhubert" / "conf" / "pretrain"
PY = sys.executable
CLI = Path(PY).with_name("fairseq-hydra-train")
# a one-block ResNet trunk keeps each update around a second on 2 cores
FAST = ["model.resnet_layers=[1,0,0,0]", "dataset.max_tokens=200", "task.max_trim_sample_size=100"]


def _env(threads=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _data_overrides(corpus: Path, label_rate: int):
    return [f"task.data={corpus}", f"task.label_dir={corpus}", f"model.label_rate={label_rate}"]


def _entry_cmd(overrides, rank=0, world_size=1, init_method=None):
    code = ("import sys, json; from avhubert.train_entry import run_fairseq_train; "
            f"run_fairseq_train({str(CONF)!r}, 'tiny', json.loads(sys.argv[1]), rank={rank}, "
            f"world_size={world_size}, init_method={init_method!r}, device='cpu')")
    return [PY, "-c", code, json.dumps(overrides)]


def _run(cmd, log: Path, timeout=240):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(log.parent),
                              timeout=timeout)
    return proc.returncode, log.read_text()


def _records(log_text: str, tag: str):
    """The json stats fairseq logs under logger ``tag`` (train_inner, valid, train)."""
    out = []
    for line in log_text.splitlines():
        m = re.search(r"\b" + tag + r"\b\]?(?:\[INFO\])?\s*[-:]\s*(\{.*\})\s*$", line)
        if m:
            out.append(json.loads(m.group(1)))
    return out


def _updates(ckpt: Path) -> int:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return int(state["optimizer_history"][-1]["num_updates"])


@pytest.mark.timeout(400)
def test_cli_pretraining_then_resume_with_train_entry(av_corpus_100hz, tmp_path):
    save = tmp_path / "ckpt"
    common = _data_overrides(av_corpus_100hz, 100) + FAST + [
        f"checkpoint.save_dir={save}", "optimization.lr=[0.002]", "lr_scheduler.warmup_updates=3",
        "+lr_scheduler.total_num_update=30", "checkpoint.save_interval_updates=0",
    ]
    # segment 1: the real fairseq-hydra-train CLI, 10 updates
    rc, log1 = _run([str(CLI), "--config-dir", str(CONF), "--config-name", "tiny",
                     f"common.user_dir={REPO / 'avhubert'}", "common.cpu=true",
                     f"hydra.run.dir={tmp_path / 'hydra'}", "optimization.max_update=10"] + common,
                    tmp_path / "cli.log")
    assert rc == 0, log1[-3000:]
    assert _updates(save / "checkpoint_last.pt") == 10
    inner1 = _records(log1, "train_inner")
    assert [int(r["num_updates"]) for r in inner1] == list(range(1, 11))

    # segment 2: our command line (run_fairseq_train) resumes from checkpoint_last.pt, to 20 updates
    rc, log2 = _run([PY, "-m", "avhubert.train_entry", "--config-dir", str(CONF), "--config-name", "tiny",
                     "--device", "cpu", "optimization.max_update=20"] + common, tmp_path / "resume.log")
    assert rc == 0, log2[-3000:]
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 10 updates\)", log2), log2[-3000:]
    inner2 = _records(log2, "train_inner")
    assert [int(r["num_updates"]) for r in inner2] == list(range(11, 21))
    assert _updates(save / "checkpoint_last.pt") == 20

    # what the features stage does with it: load our checkpoint and extract a layer
    from avhubert.extract import extract_layer, load_pretrained

    model, task_cfg = load_pretrained(str(save / "checkpoint_last.pt"))
    assert not model.training and task_cfg.label_rate == 100
    feats = extract_layer(model, torch.randn(1, 1, 30, 88, 88), torch.randn(1, 104, 30), None, layer=1)
    assert feats.shape == (1, 30, 64) and torch.isfinite(feats).all()

    losses = [float(r["loss"]) for r in inner1 + inner2]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, f"training loss did not decrease: {losses}"
    valid = [float(r["valid_loss"]) for r in _records(log1 + "\n" + log2, "valid")]
    assert len(valid) >= 4 and min(valid[-2:]) < valid[0], valid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_and_close(proc: subprocess.Popen, log, timeout: float = 300) -> None:
    """Wait for a training process (killed past ``timeout``) and close its log."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _two_ranks(tmp_path: Path, tag: str, cmd_of_rank):
    """Run ``cmd_of_rank(rank, init_method)`` for ranks 0 and 1 at once: [(exit status, log text)]."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for rank in range(2):
        logs.append(tmp_path / f"{tag}_rank{rank}.log")
        f = open(logs[-1], "w")
        procs.append((subprocess.Popen(cmd_of_rank(rank, init), stdout=f,
                                       stderr=subprocess.STDOUT, env=_env(), cwd=str(tmp_path)), f))
    for p, f in procs:
        _wait_and_close(p, f)
    return [(p.returncode, log.read_text()) for (p, _), log in zip(procs, logs)]


def _rank_overrides(corpus: Path, tmp_path: Path, rank: int, max_update: int) -> list:
    """Each rank its own save_dir, so that what rank 1 writes is visible."""
    return _data_overrides(corpus, 25) + FAST + [f"checkpoint.save_dir={tmp_path / f'ckpt_rank{rank}'}",
                                                 f"optimization.max_update={max_update}"]


def _run_two_ranks(corpus: Path, tmp_path: Path, max_update: int, tag: str):
    runs = _two_ranks(tmp_path, tag, lambda rank, init: _entry_cmd(
        _rank_overrides(corpus, tmp_path, rank, max_update), rank, 2, init))
    texts = [text for _, text in runs]
    for rank, ((returncode, _), text) in enumerate(zip(runs, texts)):
        assert returncode == 0, f"{tag}: rank {rank} failed:\n{text[-3000:]}"
        assert f"distributed init (rank {rank})" in text
    return texts


@pytest.mark.timeout(500)
def test_two_rank_cpu_distributed(av_corpus_25hz, tmp_path):
    """Two processes, gloo over tcp://127.0.0.1. Each rank gets its own save_dir so that what rank 1
    writes is visible: it must write nothing, also when resuming (state broadcast from rank 0)."""
    import hashlib
    import shutil

    texts = _run_two_ranks(av_corpus_25hz, tmp_path, 2, "first")
    assert _updates(tmp_path / "ckpt_rank0" / "checkpoint_last.pt") == 2
    inner = _records(texts[0], "train_inner")
    assert [int(r["num_updates"]) for r in inner] == [1, 2]
    # 4 train clips, 2 ranks, one batch per rank and update: logging outputs are summed over ranks
    assert all(float(r["bsz"]) == 4 for r in inner), inner
    assert not (tmp_path / "ckpt_rank1").exists()

    # resume: fairseq checks the file on every rank, reads it on rank 0 and broadcasts the state
    (tmp_path / "ckpt_rank1").mkdir()
    shutil.copyfile(tmp_path / "ckpt_rank0" / "checkpoint_last.pt", tmp_path / "ckpt_rank1" / "checkpoint_last.pt")
    digest = hashlib.sha256((tmp_path / "ckpt_rank1" / "checkpoint_last.pt").read_bytes()).hexdigest()
    texts = _run_two_ranks(av_corpus_25hz, tmp_path, 3, "resume")
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 2 updates\)", texts[0])
    assert [int(r["num_updates"]) for r in _records(texts[0], "train_inner")] == [3]
    assert _updates(tmp_path / "ckpt_rank0" / "checkpoint_last.pt") == 3
    assert [p.name for p in (tmp_path / "ckpt_rank1").iterdir()] == ["checkpoint_last.pt"]
    assert hashlib.sha256((tmp_path / "ckpt_rank1" / "checkpoint_last.pt").read_bytes()).hexdigest() == digest


# train_inner values that measure time, not training
TIMING_KEYS = {"wps", "ups", "wpb", "bsz", "wall", "train_wall", "gb_free"}
# BASE's iterations 2-5: input masking with same_seq video substitution (every masking draw taken)
INPUT_MASKING = ["model.masking_type=input", "model.selection_type=same_seq", "model.mask_prob_image=0.3",
                 "model.mask_length_image=5", "model.mask_prob_audio=0.8", "model.mask_length_audio=10"]
NO_SCHEDULED_SAVES = ["checkpoint.save_interval_updates=0", "dataset.validate_interval=100"]


@pytest.mark.timeout(400)
def test_one_seed_trains_the_same_model_another_seed_another(av_corpus_25hz, tmp_path):
    """Pretraining with input masking (video sources, audio mask_emb, modality dropout): two runs
    with one seed log the same values at every update and save bitwise-identical weights (one
    thread each); another seed gives other losses. fairseq's own span masks drew fresh OS entropy
    on every call, whatever the seed."""
    def start(tag, seed):
        overrides = _data_overrides(av_corpus_25hz, 25) + FAST + [
            f"checkpoint.save_dir={tmp_path / tag}", "optimization.max_update=3", f"common.seed={seed}",
            *INPUT_MASKING, *NO_SCHEDULED_SAVES]
        log = open(tmp_path / f"{tag}.log", "w")
        return subprocess.Popen(_entry_cmd(overrides), stdout=log, stderr=subprocess.STDOUT, env=_env(threads=1),
                                cwd=str(tmp_path)), log

    def finish(tag, proc_log):
        _wait_and_close(*proc_log)
        proc = proc_log[0]
        text = (tmp_path / f"{tag}.log").read_text()
        assert proc.returncode == 0, f"{tag}:\n{text[-3000:]}"
        inner = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _records(text, "train_inner")]
        assert [int(r["num_updates"]) for r in inner] == [1, 2, 3]
        state = torch.load(tmp_path / tag / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        return inner, state["model"]

    # the two same-seed runs side by side (one thread each), then the other seed
    first, second = start("seed1_a", 1), start("seed1_b", 1)
    (inner_a, model_a), (inner_b, model_b) = finish("seed1_a", first), finish("seed1_b", second)
    inner_c, model_c = finish("seed2", start("seed2", 2))
    assert inner_a == inner_b
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "same seed, other weights"
    assert [r["loss"] for r in inner_c] != [r["loss"] for r in inner_a]
    assert any(not torch.equal(model_a[k], model_c[k]) for k in model_a)


@pytest.mark.timeout(400)
def test_a_run_stopped_and_resumed_ends_with_the_weights_of_a_straight_run(av_corpus_25hz, tmp_path):
    """Stopped mid-epoch at update 3 and resumed to 6, a run saves bitwise the weights of one that
    ran to 6 straight: the masks, the random crops and fairseq's layerdrop all draw from
    generators keyed by (seed, update or epoch, item), none from the process-wide numpy RNG's
    position (which fairseq reseeds when it starts)."""
    def run(tag, max_update):
        overrides = _data_overrides(av_corpus_25hz, 25) + FAST + [
            f"checkpoint.save_dir={tmp_path / tag}", f"optimization.max_update={max_update}", "common.seed=1",
            *INPUT_MASKING, "task.random_crop=true", "model.encoder_layerdrop=0.3", *NO_SCHEDULED_SAVES]
        with open(tmp_path / f"{tag}.log", "a") as log:
            proc = subprocess.run(_entry_cmd(overrides), stdout=log, stderr=subprocess.STDOUT,
                                  env=_env(threads=1), cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 0, (tmp_path / f"{tag}.log").read_text()[-3000:]
        return torch.load(tmp_path / tag / "checkpoint_last.pt", map_location="cpu", weights_only=False)

    straight = run("straight", 6)
    run("resumed", 3)
    resumed = run("resumed", 6)
    assert int(resumed["optimizer_history"][-1]["num_updates"]) == 6
    assert "@ 3 updates" in (tmp_path / "resumed.log").read_text()
    assert straight["model"].keys() == resumed["model"].keys()
    differ = [k for k in straight["model"] if not torch.equal(straight["model"][k], resumed["model"][k])]
    assert not differ, f"resumed weights differ from the straight run's: {differ[:5]}"


def _preemptible_cmd(overrides, rank=0, world_size=1, init_method=None, ask=False):
    """``_entry_cmd`` whose process asks its training to save and stop (``request_save_and_stop``,
    what the train stage's ``save_now`` calls from the preemption signal's handler) as soon as the
    training runs; it exits 3 on ``SavedForPreemption``."""
    code = ("import sys, json, threading, time\n"
            "from avhubert import train_entry\n"
            "def ask():\n"
            "    while not train_entry.request_save_and_stop():\n"
            "        time.sleep(0.05)\n"
            f"if {ask!r}:\n"
            "    threading.Thread(target=ask, daemon=True).start()\n"
            "try:\n"
            f"    train_entry.run_fairseq_train({str(CONF)!r}, 'tiny', json.loads(sys.argv[1]), rank={rank}, "
            f"world_size={world_size}, init_method={init_method!r}, device='cpu')\n"
            "except train_entry.SavedForPreemption as e:\n"
            "    print('SavedForPreemption:', e, flush=True)\n"
            "    sys.exit(3)\n")
    return [PY, "-c", code, json.dumps(overrides)]


@pytest.mark.timeout(500)
def test_a_preemption_request_on_rank_0_saves_at_the_next_update_on_both_ranks_and_resumes(av_corpus_25hz, tmp_path):
    """Nothing is saved on schedule (save intervals of 1000); rank 0 alone is asked to save and stop.
    Both ranks stop at the same update (the all-reduced flag), rank 0 writes checkpoint_last.pt with
    fairseq's own save, and a later run resumes from that update to max_update."""
    no_saves = ["checkpoint.save_interval=1000", "checkpoint.save_interval_updates=1000",
                "dataset.validate_interval=1000"]
    runs = _two_ranks(tmp_path, "preempted", lambda rank, init: _preemptible_cmd(
        _rank_overrides(av_corpus_25hz, tmp_path, rank, 4) + no_saves, rank, 2, init, ask=rank == 0))
    texts = [text for _, text in runs]
    for rank, (returncode, text) in enumerate(runs):
        assert returncode == 3 and "SavedForPreemption: training saved checkpoint_last.pt at update" in text, \
            f"rank {rank} (exit {returncode}):\n{text[-3000:]}"
    saved = _updates(tmp_path / "ckpt_rank0" / "checkpoint_last.pt")
    assert 1 <= saved < 4, saved
    assert re.search(rf"preemption: saving checkpoint_last\.pt at update {saved} \([\d.]+ s after the request\)",
                     texts[0]), texts[0][-3000:]
    assert f"preemption: saving checkpoint_last.pt at update {saved} (asked on another rank)" in texts[1]
    assert not (tmp_path / "ckpt_rank1").exists()  # rank 0 writes; rank 1 only took part

    overrides = _rank_overrides(av_corpus_25hz, tmp_path, 0, 4) + no_saves
    rc, text = _run(_preemptible_cmd(overrides), tmp_path / "resumed.log")
    assert rc == 0, text[-3000:]
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ {saved} updates\)", text), text[-3000:]
    assert [int(r["num_updates"]) for r in _records(text, "train_inner")] == list(range(saved + 1, 5))
    assert _updates(tmp_path / "ckpt_rank0" / "checkpoint_last.pt") == 4
