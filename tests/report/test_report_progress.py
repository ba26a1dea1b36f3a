"""The run report keeps up with a run: rewritten in the background after each completed step, with
per step shards done/failed/running/pending and the ETA that `status` prints (a real launch of the
whole pipeline on the sample corpus, local executor, stopped once the report showed the crop)."""
import html
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _text(page: str, anchor: str) -> str:
    """The plain text of one section of the page."""
    start = page.index(f'id="{anchor}"')
    end = page.find("<section", start)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page[start:end])).split())


def test_the_report_is_refreshed_during_a_launch_with_the_steps_progress_and_eta(sample_corpus, tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    launch = [sys.executable, str(ROOT / "launch.py")]
    log = open(tmp_path / "launch.log", "w")
    p = subprocess.Popen([*launch, "--stage", "all", "--preset", "smoke", "--cluster", "local", "--workdir",
                          str(work), "--corpus", str(sample_corpus)], stdout=log, stderr=subprocess.STDOUT,
                         env=env, cwd=ROOT, start_new_session=True)
    index, launches = work / "report" / "index.html", work / "report" / "launches.jsonl"
    try:
        deadline = time.time() + 600
        while not index.exists():  # the first page comes from a refresh after a step, not the launch's end
            assert p.poll() is None, (tmp_path / "launch.log").read_text()
            assert time.time() < deadline, "no report written during the launch"
            time.sleep(0.5)
        page = index.read_text()
        assert not launches.exists(), "the launch ended before a refresh wrote the report"
        status = subprocess.run([*launch, "status", "--workdir", str(work)], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=120).stdout
    finally:
        subprocess.run([*launch, "cancel", "--workdir", str(work)], capture_output=True, env=env, cwd=ROOT, timeout=300)
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    progress = _text(page, "progress")
    rows = re.findall(r"(–|\d+) (\w+) (\d+)/(\d+|–) (\d+) (\d+) (\d+) ", progress)
    steps = {(it, stage): (int(done), total, int(failed), int(running), int(pending))
             for it, stage, done, total, failed, running, pending in rows}
    # the whole launch is listed: crop complete, the later iterations' steps not started
    assert steps[("–", "crop")] == (4, "4", 0, 0, 0), progress
    assert ("2", "train") in steps and steps[("2", "train")][0] == 0, progress
    assert ("–", "finetune") in steps, progress
    assert "every step of the last launch is complete" not in progress
    # the page knows it was written during a launch: the run is running, the launch is named
    assert 'class="badge running">running</span></h1>' in page
    assert "Under way: another launch (pid" in progress, progress
    # the time left says what it comes from; the crop's shard time is measured
    assert re.search(r"time left [\d.]+ (s|min|h)", progress) and "ends about" in progress, progress
    assert re.search(r"(measured|estimated|partly estimated) · ends about", progress), progress
    # every AV-HuBERT stage has an estimate: a step whose shards are not known yet (iteration 2)
    # is timed by its estimate's jobs, never left out
    assert "unknown" not in progress and "Not counted" not in progress, progress
    # status prints the same kind of figures
    assert "ETA run: " in status and "left (" in status, status
    log_text = (tmp_path / "launch.log").read_text()
    assert "warning: refreshing" not in log_text, log_text
