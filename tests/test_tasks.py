"""Agentic tasks: task files, the sandboxed tools, the episode loop, completion rate in eval, GRPO on a task."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from appliance import tasks
from appliance.errors import UsageError
from tests.test_train_run import FAST, run

TOOLS = '''
import os, time

def lookup(asset: str) -> dict:
    if asset != "pump":
        raise KeyError(f"no asset named {asset!r}")
    return {"asset": asset, "risk": "high"}

def hang(seconds: int) -> int:
    time.sleep(seconds)
    return seconds

def env() -> dict:
    return dict(os.environ)

def hog() -> int:
    return len(bytearray(4 << 30))

def noisy() -> str:
    print("progress: 50%")
    return "done"

def parent_env() -> str:
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        return f.read().decode(errors="replace")

def spawn() -> int:
    import subprocess
    return subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
'''


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: dead, not yet reaped
    except OSError:
        return True


def write_task(d: Path, extra: str = "", timeout: float = 1.0) -> Path:
    (d / "site_tools.py").write_text(TOOLS)
    p = d / "t.toml"
    p.write_text(textwrap.dedent(f'''
        [task]
        name = "t"
        goal = "Risk of the {{asset}}?"
        max_steps = 3
        tool_timeout = {timeout}

        [[tool]]
        name = "lookup"
        function = "site_tools:lookup"
        args = {{ asset = "str" }}

        [[tool]]
        name = "hang"
        function = "site_tools:hang"
        args = {{ seconds = "int" }}

        [[tool]]
        name = "env"
        function = "site_tools:env"

        [[tool]]
        name = "hog"
        function = "site_tools:hog"

        [[tool]]
        name = "noisy"
        function = "site_tools:noisy"

        [[tool]]
        name = "parent_env"
        function = "site_tools:parent_env"

        [[tool]]
        name = "spawn"
        function = "site_tools:spawn"

        [success]
        answer_contains = "{{expect}}"
        tool_called = "lookup"

        [[episode]]
        vars = {{ asset = "pump" }}
        expect = "high"
        ''') + extra)
    return p


def scripted(*replies: str):
    """A stand-in for the model that says these replies in order: the loop, not a model, is under test."""
    it = iter(replies)
    return lambda prompt: next(it)


def test_an_episode_calls_the_tool_in_the_sandbox_and_is_judged(tmp_path):
    task = tasks.load(write_task(tmp_path))
    call = json.dumps({"name": "lookup", "arguments": {"asset": "pump"}})
    seen = []
    r = tasks.run_episode(task, lambda p: (seen.append(p), [call, "high risk"][len(seen) - 1])[1], 0)
    assert r["success"] and r["steps"] == 2 and r["calls"][0]["ok"] and r["calls"][0]["result"]["risk"] == "high"
    assert 'Result: {"asset": "pump", "risk": "high"}' in seen[1]  # the model saw the tool's answer
    # a wrong argument, then a raising tool: errors the model sees; the episode goes on and can still succeed
    bad = json.dumps({"name": "lookup", "arguments": {"asset": 3}})
    missing = json.dumps({"name": "lookup", "arguments": {"asset": "kettle"}})
    r = tasks.run_episode(task, scripted(bad, missing, "high"), 0)  # the right answer, but never looked up
    assert not r["success"] and r["reason"] == "lookup was never called successfully" and r["steps"] == 3
    assert r["calls"][0]["error"] == "argument asset must be str" and "KeyError" in r["calls"][1]["error"]
    r = tasks.run_episode(task, scripted(bad, bad, bad), 0)
    assert not r["success"] and r["reason"] == "no answer within 3 steps"


def test_a_hanging_tool_fails_the_episode_and_tools_see_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "do-not-leak")
    task = tasks.load(write_task(tmp_path, timeout=1.0))
    r = tasks.run_episode(task, scripted(json.dumps({"name": "hang", "arguments": {"seconds": 30}})), 0)
    assert not r["success"] and r["reason"] == "hang did not answer within 1 s" and r["calls"][0]["fatal"]
    env = tasks.call_tool(task, "env", {})
    assert env["ok"] and not any("APPLIANCE" in k for k in env["result"]) and "HOME" not in env["result"]
    hog = tasks.call_tool(task, "hog", {})  # 4 GiB against a 1 GiB limit: an error, not a dead machine
    assert not hog["ok"] and "MemoryError" in hog["error"]
    # The passphrase may be in this process's environment. It is non-dumpable, and under root the tool runs as
    # nobody (root would read any process's /proc files), so the read fails for every user the suite runs as.
    peek = tasks.call_tool(task, "parent_env", {})
    assert not peek["ok"] and "PermissionError" in peek["error"]
    assert tasks.call_tool(task, "noisy", {}) == {"ok": True, "result": "done", "seconds": pytest.approx(0, abs=30)}
    pid = tasks.call_tool(task, "spawn", {})["result"]  # what a tool leaves running goes with it
    end = time.time() + 10  # SIGKILL is sent; the kernel takes a moment to carry it out
    while time.time() < end and not gone(pid):
        time.sleep(0.05)
    assert gone(pid)


def test_a_malformed_task_lists_every_problem(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[task]\nname = "Bad Name"\nmax_steps = 0\n[[tool]]\nname = "x"\nfunction = "nomodule"\n'
                 'args = { a = "list" }\n[success]\ntool_called = "y"\n[[episode]]\nvars = { b = 1 }\nsplit = "test"\n')
    with pytest.raises(UsageError) as e:
        tasks.load(p)
    msg = e.value.message
    for part in ("name must be lowercase", "goal is required", "max_steps must be", "function must be module:function",
                 "args maps each argument", "tool_called names 'y'", "split must be train or validation"):
        assert part in msg, part
    for where in ("2: [task] name", "1: [task] goal", "3: [task] max_steps", "6: [[tool]] #1 (x): function",
                  "7: [[tool]] #1 (x): args", "9: [success] tool_called", "12: [[episode]] #1: split"):
        assert f"{p}:{where}" in msg, where  # each problem with its place in the file, as suites do
    with pytest.raises(UsageError, match="no task named 'nope'"):
        tasks.load("nope")
    p.write_text('tool = "x"\n[task]\nname = "t"\ngoal = 5\n[success]\ntool_called = ["x"]\n'
                 'answer_contains = "{expect}"\n[[episode]]\nvars = { expect = "x" }\n[[episode]]\nvars = { a = 1 }\n')
    with pytest.raises(UsageError) as e:  # wrong types everywhere: listed, never a traceback
        tasks.load(p)
    for part in ("write [[tool]]", "goal is required", "tool_called must be a non-empty string",
                 "'expect' is the episode's own key", "answer_contains is empty for this episode"):
        assert part in e.value.message, part
    assert f"{p}:1: write [[tool]]" in e.value.message and f"{p}:9: [[episode]] #1: 'expect'" in e.value.message
    p.write_text('[task]\nname = "t"\ngoal = \n')
    with pytest.raises(UsageError, match=r"bad.toml:3: not valid TOML"):
        tasks.load(p)


def test_answers_are_matched_as_words_or_whole(tmp_path):
    task = tasks.load(write_task(tmp_path))
    ok = [{"tool": "lookup", "ok": True}]
    assert tasks.judge(task, 0, "It is HIGH.", ok) == (True, None)
    assert not tasks.judge(task, 0, "highly unlikely", ok)[0]  # whole words only
    shipped = tasks.load("asset-risk")  # answer_regex: the class alone, not every class at once
    assert tasks.judge(shipped, 0, "high risk", ok) == (True, None)
    assert not tasks.judge(shipped, 0, "high or low or medium", ok)[0]


@pytest.mark.slow
def test_eval_reports_the_completion_rate_and_keeps_each_transcript(ghome, cli, tmp_path):
    suite = tmp_path / "agent.toml"
    suite.write_text('[suite]\nname = "agent"\n[[metric]]\ntype = "task"\ntask = "asset-risk"\nsplit = "validation"\n'
                     'max_tokens = 24\nmin = 0.9\n')
    r = cli("--home", ghome, "--json", "eval", "run", str(suite), "--model", "gsft-merged@1")
    assert r.code == 0, r.err
    d = r.json
    m = d["metrics"]
    assert m["task_completion_episodes"] == 3 and 0.0 <= m["task_completion"] <= 1.0
    assert d["cases"] == 3 and d["checks"][0]["metric"] == "task_completion" and d["checks"][0]["limit"] == ">= 0.9"
    case = d["case_results"][0]
    assert case["case"].startswith("task:asset-risk#") and {"goal", "calls", "steps", "reason"} <= set(case["scores"])
    # a task file is a suite of its own, by shipped name too
    r = cli("--home", ghome, "--json", "eval", "run", "asset-risk", "--model", "gsft-merged@1")
    assert r.code == 0 and r.json["metrics"]["task_completion_episodes"] == 12 and r.json["suite"] == "asset-risk"
    cmp = cli("--home", ghome, "--json", "eval", "compare", d["id"], d["id"]).json
    assert cmp["metrics"]["task_completion"]["higher_is_better"] is True


def test_grpo_plays_the_task_and_records_it(ghome, cli):
    d = run(cli, ghome, "grpo-task", "--model.base", "gsft-merged@1", *FAST, "--train.max_steps", "2",
            "--train.batch_size", "2", "--train.micro_batch_size", "2", "--grpo.group_size", "2",
            "--grpo.max_new_tokens", "16", "--train.eval_every", "2", "--lora.merge", "false")
    assert d["id"] == "grpo-task@1" and d["data"]["prompts"] == 9  # the train episodes
    m = cli("--home", ghome, "--json", "train", "metrics", "grpo-task@1").json["metrics"]
    assert len(m) == 2 and all(0 <= x["reward"] <= 1 for x in m) and -1 <= m[-1]["val_loss"] <= 0
    node = cli("--home", ghome, "--json", "lineage", "grpo-task@1").json["lineage"]
    assert node["attrs"]["task"]["name"] == "asset-risk" and len(node["attrs"]["task"]["sha256"]) == 64
    played = node["attrs"]["metrics"]["rewards"]["episodes"]
    assert played["played"] >= 8 and played["succeeded"] <= played["played"]


def test_a_task_recipe_is_checked_before_training(ghome, cli):
    r = cli("--home", ghome, "train", "run", "grpo-task", "--data.task", "nope")
    assert r.code == 2 and "data.task: no task named 'nope'" in r.err
    r = cli("--home", ghome, "train", "run", "grpo-task", "--data.datasets", "handbook-qa")
    assert r.code == 2 and "data.datasets is not used by data.format 'task'" in r.err
