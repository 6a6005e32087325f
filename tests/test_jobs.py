"""Jobs: a persistent queue in the vault, detached runners, GPU hand-out, sealed logs, recovery after a kill."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import open_vault

TINY = ["--train.max_steps", "6", "--train.warmup_steps", "0", "--train.checkpoint_every", "3"]
SHORT = ["--train.max_steps", "2", "--train.warmup_steps", "0", "--train.checkpoint_every", "100"]


def wait_until(cond, timeout=180.0, every=0.3):
    end = time.time() + timeout
    while time.time() < end:
        if got := cond():
            return got
        time.sleep(every)
    raise AssertionError("timed out")


def job(home, job_id):
    from appliance.jobs import queue

    with open_vault(home, read_only=True) as v:
        return queue.get(v.con, job_id)


def ended(home, job_id):
    try:
        j = job(home, job_id)
    except Exception:  # the vault is held for a moment by a runner: ask again
        return None
    return j if not j.active else None


def logged(cli, home, job_id, text) -> bool:
    """The job's log has a line with `text` (not yet, too, while a runner holds the vault for a moment)."""
    r = cli("--home", home, "--json", "jobs", "logs", job_id)
    return r.code == 0 and any(text in ln for ln in r.json["lines"])


@pytest.mark.slow
def test_a_submitted_run_goes_on_alone_and_lands_in_lineage(train_home, cli):
    from appliance.home import Home
    from appliance.jobs.log import JobLog

    r = cli("--home", train_home, "--json", "jobs", "submit", "tiny-dense", *TINY, "--name", "bg")
    assert r.code == 0, r.err
    d = r.json
    assert d["id"] == "job-1" and d["status"] == "running" and d["spec"]["recipe"]["train"]["max_steps"] == 6
    assert d["pid"] and d["submitted_by"]
    done = wait_until(lambda: ended(train_home, "job-1"))
    assert done.status == "done" and done.ref == "bg@1" and done.result["steps"] == 6, done.error
    lines = cli("--home", train_home, "--json", "jobs", "logs", "job-1").json["lines"]
    assert any("run bg@1: 6 steps" in ln for ln in lines) and lines[-1].endswith("job-1 done")
    assert any("checkpoint at step 3" in ln for ln in lines)
    # the log is sealed on disk: private, no line readable, and a wrong key opens nothing
    raw = (Home(train_home).logs / "jobs" / "job-1.log").read_bytes()
    assert raw.count(b"\n") >= 5 and b"loss" not in raw and b"bg@1" not in raw
    assert oct((Home(train_home).logs / "jobs" / "job-1.log").stat().st_mode)[-3:] == "600"
    stranger = JobLog(Home(train_home).logs, "job-1", os.urandom(32)).lines()
    assert stranger and all(ln.startswith("[a line that does not open") for ln in stranger)
    # the follow mode ends by itself once the job has ended
    assert "job-1 done" in cli("--home", train_home, "jobs", "logs", "job-1", "-f").out
    followed = cli("--home", train_home, "--json", "jobs", "logs", "job-1", "-f")  # one object, schema-checked
    assert followed.json["status"] == "done" and "job-1 done" in "\n".join(followed.json["lines"])
    lineage = cli("--home", train_home, "--json", "lineage", "bg@1").json["lineage"]
    assert {p["id"] for p in lineage["parents"]} == {"handbook@1", "handbook-bpe@1"}
    actions = [e["action"] for e in cli("--home", train_home, "--json", "audit", "log").json["entries"]]
    assert actions[-5:] == ["jobs.submit", "jobs.start", "train.start", "train.run", "jobs.done"]
    assert cli("--home", train_home, "--json", "jobs", "list").json["jobs"] == []
    assert [j["id"] for j in cli("--home", train_home, "--json", "jobs", "list", "--all").json["jobs"]] == ["job-1"]
    assert cli("--home", train_home, "--json", "jobs", "show", "job-1").json["result"]["id"] == "bg@1"


def test_bad_submissions_are_one_line_and_queue_nothing(train_home, cli):
    r = cli("--home", train_home, "jobs", "submit", "no-such-recipe")
    assert r.code == 2 and r.err.count("\n") == 1 and "no recipe named" in r.err
    r = cli("--home", train_home, "jobs", "submit", "tiny-dense", "--train.max_steps", "zero")
    assert r.code == 2 and "train.max_steps" in r.err
    r = cli("--home", train_home, "jobs", "cancel", "job-9")
    assert r.code == 2 and "no job job-9" in r.err
    assert cli("--home", train_home, "--json", "jobs", "list", "--all").json["jobs"] == []


@pytest.mark.slow
def test_gpus_are_handed_out_and_big_jobs_wait(train_home, cli, monkeypatch):
    """Two 1-GPU runs side by side on a 2-GPU box; a 2-GPU run waits for both; more than the box is refused."""
    monkeypatch.setenv("APPLIANCE_GPUS", "2")
    # Few steps are enough: a runner spends seconds importing torch before its first step, and a job holds its
    # GPUs from the moment it is started until it is recorded as finished.
    a = cli("--home", train_home, "--json", "jobs", "submit", "tiny-dense", "--gpus", "1", *SHORT, "--name", "a").json
    b = cli("--home", train_home, "--json", "jobs", "submit", "tiny-dense", "--gpus", "1", *SHORT, "--name", "b").json
    c = cli("--home", train_home, "--json", "jobs", "submit", "tiny-dense", "--gpus", "2", *SHORT, "--name", "c").json
    assert (a["status"], a["devices"]) == ("running", "0") and (b["status"], b["devices"]) == ("running", "1")
    assert c["status"] == "queued"
    big = cli("--home", train_home, "--json", "jobs", "submit", "tiny-dense", "--gpus", "4", *TINY).json
    assert big["status"] == "failed" and "asks for 4 GPU(s); this box has 2" in big["error"]
    done = wait_until(lambda: ended(train_home, "job-3"), timeout=300)
    assert done.status == "done" and done.devices == "0,1"
    first, second = job(train_home, "job-1"), job(train_home, "job-2")
    assert done.started >= max(first.finished, second.finished)  # it waited for both GPUs


@pytest.mark.slow
def test_cancel_stops_a_run_at_a_checkpoint_and_resume_finishes_it(train_home, cli):
    long = ["--train.max_steps", "400", "--train.warmup_steps", "0", "--train.checkpoint_every", "2"]
    cli("--home", train_home, "jobs", "submit", "tiny-dense", *long, "--name", "stopme")
    runs_dir = train_home / "artifacts" / "runs" / "stopme@1" / "checkpoints"
    wait_until(lambda: runs_dir.is_dir() and any(runs_dir.iterdir()))
    r = cli("--home", train_home, "--json", "jobs", "cancel", "job-1")
    assert r.code == 0 and r.json["cancel"] is True
    stopped = wait_until(lambda: ended(train_home, "job-1"))
    assert stopped.status == "cancelled" and stopped.ref == "stopme@1"
    run = cli("--home", train_home, "--json", "train", "runs", "--name", "stopme").json["runs"][0]
    assert run["status"] == "interrupted" and 0 < run["step"] < 400
    assert cli("--home", train_home, "jobs", "cancel", "job-1").code == 2  # already ended
    r = cli("--home", train_home, "--json", "jobs", "resume", "job-1", "--json")
    assert r.code == 0 and r.json["spec"]["resume"] is True
    # resuming does not need the rest of 400 steps to prove itself: stop it again and look at the step
    wait_until(lambda: logged(cli, train_home, "job-2", "resuming at step"))
    cli("--home", train_home, "jobs", "cancel", "job-2")
    assert wait_until(lambda: ended(train_home, "job-2")).status == "cancelled"


@pytest.mark.slow
def test_a_killed_runner_is_recovered_and_its_run_resumes(train_home, cli):
    long = ["--train.max_steps", "12", "--train.warmup_steps", "0", "--train.checkpoint_every", "3"]
    j = cli("--home", train_home, "--json", "jobs", "submit", "tiny-dense", *long, "--name", "crash").json
    ckpts = train_home / "artifacts" / "runs" / "crash@1" / "checkpoints"
    # a complete checkpoint: the one being written is a hidden temp directory beside it until every shard is in
    wait_until(lambda: ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()), every=0.02)
    os.kill(j["pid"], signal.SIGKILL)  # as a power cut would
    wait_until(lambda: not os.path.exists(f"/proc/{j['pid']}") or open(f"/proc/{j['pid']}/stat").read().split()[2]
               == "Z")
    listed = cli("--home", train_home, "--json", "jobs", "list").json["jobs"]  # finds it, queues it, starts it
    assert listed[0]["id"] == "job-1" and listed[0]["status"] == "running" and listed[0]["attempts"] == 2
    assert listed[0]["spec"]["resume"] is True
    done = wait_until(lambda: ended(train_home, "job-1"))
    assert done.status == "done" and done.ref == "crash@1" and done.result["resumed_from"] >= 3
    assert done.result["steps"] == 12


@pytest.fixture(scope="module")
def qm_base(train_base, tmp_path_factory):
    """train_base plus a tiny model `qm@1`, trained once for the quantize and eval jobs."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run
    from tests.conftest import copy_home

    h = copy_home(train_base, tmp_path_factory.mktemp("qm"))
    with pytest.MonkeyPatch.context() as mp:  # as the function-scoped autouse fixture sets it for every test
        mp.setenv("APPLIANCE_TRAIN_THREADS", "1")
        with open_vault(h) as v:
            run(v, load_recipe("tiny-dense", ["name=qm", "train.max_steps=2", "train.warmup_steps=0",
                                              "train.checkpoint_every=100"]))
    return h


@pytest.mark.parametrize("kind", ["quantize", "eval"])
def test_quantize_and_eval_run_as_jobs(qm_base, tmp_path, cli, kind):
    from appliance.jobs import queue
    from appliance.jobs.dispatch import dispatch
    from tests.conftest import copy_home

    train_home = copy_home(qm_base, tmp_path)
    spec = {"model": "qm@1", "type": "q8_0"} if kind == "quantize" else {"suite": "handbook@1", "model": "qm@1"}
    with open_vault(train_home) as v:
        j = queue.submit(v, kind, spec)
        assert dispatch(v) == [j.id]
    done = wait_until(lambda: ended(train_home, j.id))
    assert done.status == "done", done.error
    assert done.ref == ("qm@1:q8_0" if kind == "quantize" else done.result["id"])
    node = cli("--home", train_home, "--json", "lineage", done.ref).json["lineage"]
    assert node["kind"] == ("gguf" if kind == "quantize" else "eval")


def test_the_work_loop_starts_what_dispatch_starts_and_rides_out_errors(monkeypatch):
    """`appliance jobs work` is `dispatch.work`: a round per tick; a busy vault or a failed start is reported,
    and the next round goes on."""
    from appliance.errors import VaultBusy
    from appliance.jobs import dispatch

    rounds = iter([["job-1"], VaultBusy("the vault is busy"), OSError("no runner"), ["job-2", "job-3"]])

    def fake_dispatch(vault):
        r = next(rounds)
        if isinstance(r, Exception):
            raise r
        return r

    monkeypatch.setattr(dispatch, "dispatch", fake_dispatch)
    started, errors, slept = [], [], []
    dispatch.work(object(), 2.5, on_started=started.append, on_error=lambda e: errors.append(str(e)),
                  stop=lambda: len(slept) == 4, sleep=slept.append)
    assert started == ["job-1", "job-2", "job-3"]
    assert errors == ["the vault is busy", "no runner"] and slept == [2.5] * 4
