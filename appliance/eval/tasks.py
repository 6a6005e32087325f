"""Agentic tasks: a model completes a goal with the site's own tools, in a bounded, logged loop.

A task file (TOML) declares:

    [task]
    name = "asset-risk"
    goal = "What is the risk class of asset {asset_id}?"   # filled from each episode's vars
    max_steps = 4                                          # model turns per episode
    tool_timeout = 5.0                                     # seconds per tool call

    [[tool]]
    name = "lookup_asset"
    function = "site_tools:lookup_asset"                   # module:function, imported in the sandbox
    description = "The register row of an asset."
    args = { asset_id = "str" }                            # str, int, float, bool

    [[episode]]
    vars = { asset_id = "RB-1000" }
    expect = "critical"
    split = "train"                                        # or "validation" (default train)

    [success]
    answer_contains = "{expect}"                           # and/or tool_called = "lookup_asset"

Each turn the model either calls one tool, as a JSON object {"name": ..., "arguments": {...}} on its own,
or answers. A call is checked against the declared arguments and run in a sandbox: a separate Python
process with no secrets in its environment, a private working directory, memory and CPU limits and a
wall-clock timeout. A tool that raises, or a call with a wrong name or arguments, is an error the model
sees, and the episode goes on (it may call again). A tool that hangs past its timeout, or whose sandbox
dies (out of memory, a crash), ends the episode as failed with that reason. Every call is kept with its
arguments, outcome and time: in the eval run's cases, and counted in a training run's summary.

Shipped tasks live in `appliance/eval/taskfiles/` and are named without the `.toml`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import UsageError

TASKS_DIR = Path(__file__).parent / "taskfiles"
SPLITS = ("train", "validation")
RESULT_CHARS = 2000  # a tool's answer is cut to this many characters before the model sees it
TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}
SANDBOX_MEMORY = 1 << 30  # bytes of address space a tool may use


@dataclass
class Tool:
    name: str
    function: str
    description: str
    args: dict[str, str]


@dataclass
class Task:
    name: str
    goal: str
    tools: dict[str, Tool]
    episodes: list[dict]
    success: dict
    max_steps: int = 4
    tool_timeout: float = 5.0
    path: str = ""
    paths: list[str] = field(default_factory=list)  # where the tool modules are imported from
    sha256: str = ""

    def indexes(self, split: str | None = None) -> list[int]:
        """Episode numbers (0-based) of a split, or all of them."""
        return [i for i, ep in enumerate(self.episodes) if split is None or ep.get("split", "train") == split]


def find(ref: str | Path) -> Path:
    """A shipped task by name, or a TOML file."""
    p = Path(ref)
    if p.suffix == ".toml" or p.exists():
        return p
    shipped = TASKS_DIR / f"{ref}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(f.stem for f in TASKS_DIR.glob("*.toml")))
    raise UsageError(f"no task {ref!r}", f"pass a task TOML file or a shipped task: {names}")


def is_task_file(path: Path) -> bool:
    """Whether a TOML file is a task (it has a [task] table) rather than an eval suite."""
    try:
        return "task" in tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def load(ref: str | Path) -> Task:
    """A checked task; every problem is listed at once, each with its place in the file."""
    import hashlib

    path = find(ref)
    try:
        data = Path(path).read_bytes()
        raw = tomllib.loads(data.decode())
    except OSError as e:
        raise UsageError(f"cannot read task file {path}: {e.strerror or e}",
                         "pass an existing task TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"task {path} is not valid TOML: {e}", "fix the file and run again") from None
    problems: list[str] = []
    t = raw.get("task") or {}
    name, goal = t.get("name"), t.get("goal")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name or ""):
        problems.append("[task] name must be lowercase letters, digits, '.', '_' or '-'")
    if not isinstance(goal, str) or not goal.strip():
        problems.append("[task] goal is required")
    max_steps, timeout = t.get("max_steps", 4), t.get("tool_timeout", 5.0)
    if not isinstance(max_steps, int) or not 1 <= max_steps <= 50:
        problems.append("[task] max_steps must be an integer from 1 to 50")
    if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        problems.append("[task] tool_timeout must be a number of seconds in (0, 600]")
    tools: dict[str, Tool] = {}
    for i, tr in enumerate(raw.get("tool") or [], 1):
        where = f"[[tool]] #{i}"
        tname, fn, args = tr.get("name"), tr.get("function"), tr.get("args", {})
        if not isinstance(tname, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tname or ""):
            problems.append(f"{where}: name must be an identifier")
            continue
        if tname in tools:
            problems.append(f"{where}: tool {tname} is declared twice")
        if not isinstance(fn, str) or not re.fullmatch(r"[\w.]+:\w+", fn or ""):
            problems.append(f"{where} ({tname}): function must be module:function")
        if not isinstance(args, dict) or any(v not in TYPES for v in args.values()):
            problems.append(f"{where} ({tname}): args maps each argument to one of {', '.join(TYPES)}")
            args = {}
        tools[tname] = Tool(tname, fn or "", str(tr.get("description", "")), dict(args))
    if not tools:
        problems.append("at least one [[tool]] is required")
    episodes = raw.get("episode") or []
    if not episodes:
        problems.append("at least one [[episode]] is required")
    success = raw.get("success") or {}
    if not set(success) & {"answer_contains", "tool_called"} or set(success) - {"answer_contains", "tool_called"}:
        problems.append("[success] takes answer_contains and/or tool_called")
    if (called := success.get("tool_called")) and called not in tools:
        problems.append(f"[success] tool_called names {called!r}, which is not a declared tool")
    for i, ep in enumerate(episodes, 1):
        if not isinstance(ep, dict) or not isinstance(ep.get("vars", {}), dict):
            problems.append(f"[[episode]] #{i}: vars must be a table")
            continue
        if extra := sorted(set(ep) - {"vars", "expect", "split"}):
            problems.append(f"[[episode]] #{i}: unknown key(s) {', '.join(extra)} (keys: vars, expect, split)")
        if ep.get("split", "train") not in SPLITS:
            problems.append(f"[[episode]] #{i}: split must be train or validation")
        for text, what in ((goal or "", "goal"), (str(success.get("answer_contains", "")), "answer_contains")):
            try:
                text.format(**ep.get("vars", {}), expect=ep.get("expect", ""))
            except (KeyError, IndexError, ValueError) as e:
                problems.append(f"[[episode]] #{i}: the {what} needs {e} and the episode does not give it")
    if problems:
        raise UsageError(f"task {path} has {len(problems)} problem(s): " + "; ".join(problems),
                         "fix the task file (see docs/EVAL.md, agentic tasks)")
    return Task(name, goal, tools, episodes, success, max_steps, float(timeout), str(path),
                [str(Path(path).resolve().parent)], hashlib.sha256(data).hexdigest())


# --- the sandbox ---------------------------------------------------------------------------------------
_RUNNER = r"""
import importlib, json, resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.path[:0] = json.loads(sys.argv[3])
mod, fn = sys.argv[1].split(":")
args = json.loads(sys.stdin.read())
try:
    out = getattr(importlib.import_module(mod), fn)(**args)
    text = json.dumps({"ok": True, "result": out})
except Exception as e:
    text = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
sys.stdout.write(text)
"""


def call_tool(task: Task, name: str, arguments) -> dict:
    """Run one call in the sandbox; {"ok", "result" | "error", "seconds"}. Never raises for the tool's sake."""
    t0 = time.perf_counter()

    def done(**kw) -> dict:
        return {**kw, "seconds": round(time.perf_counter() - t0, 3)}

    tool = task.tools.get(name)
    if tool is None:
        return done(ok=False, error=f"no tool {name!r}; the tools are {', '.join(task.tools)}")
    if not isinstance(arguments, dict):
        return done(ok=False, error="arguments must be a JSON object")
    if missing := sorted(set(tool.args) - set(arguments)):
        return done(ok=False, error=f"missing argument(s) {', '.join(missing)}")
    if extra := sorted(set(arguments) - set(tool.args)):
        return done(ok=False, error=f"unknown argument(s) {', '.join(extra)}")
    for k, typ in tool.args.items():
        v = arguments[k]
        if isinstance(v, bool) and typ != "bool" or not isinstance(v, TYPES[typ]):
            return done(ok=False, error=f"argument {k} must be {typ}")
    # -I: no PYTHONPATH, no user site; the environment carries no passphrase, key or home
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="appliance-tool-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _RUNNER, tool.function, str(SANDBOX_MEMORY),
                                   json.dumps(task.paths)], input=json.dumps(arguments), capture_output=True,
                                  text=True, timeout=task.tool_timeout, cwd=cwd, env=env)
        except subprocess.TimeoutExpired:
            return done(ok=False, fatal=True, error=f"{name} did not answer within {task.tool_timeout:g} s")
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return done(ok=False, fatal=True, error=f"{name}'s sandbox failed: {last[:300]}")
    if not isinstance(out, dict) or "ok" not in out:
        return done(ok=False, fatal=True, error=f"{name}'s sandbox answered nonsense")
    return done(**out)


# --- episodes ------------------------------------------------------------------------------------------
PROTOCOL = 'Tools: to call one, reply with only {"name": TOOL, "arguments": {...}}; else answer in plain words.'


def parse_call(text: str) -> dict | None:
    """The tool call in a reply (its first JSON object with a "name"), or None for an answer."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            return obj
        start = text.find("{", start + 1)
    return None


def prompt_for(task: Task, goal: str, turns: list[tuple[str, str]]) -> str:
    tools = "\n".join(f"- {t.name}({', '.join(f'{a}: {ty}' for a, ty in t.args.items())}): {t.description}"
                      for t in task.tools.values())
    history = "".join(f"\nYou: {said}\nResult: {result}" for said, result in turns)
    return f"{PROTOCOL}\n{tools}\nTask: {goal}{history}"


def goal_of(task: Task, index: int) -> str:
    ep = task.episodes[index]
    return task.goal.format(**ep.get("vars", {}), expect=ep.get("expect", ""))


class Episode:
    """One episode, advanced a model turn at a time (training samples many side by side)."""

    def __init__(self, task: Task, index: int):
        self.task, self.index, self.goal = task, index, goal_of(task, index)
        self.turns: list[tuple[str, str]] = []
        self.calls: list[dict] = []
        self.answer: str | None = None
        self.reason: str | None = None
        self.done = False

    def prompt(self) -> str:
        return prompt_for(self.task, self.goal, self.turns)

    def step(self, reply: str, log=lambda line: None) -> None:
        """The model's reply: an answer ends the episode; a call runs and its result joins the history."""
        reply = reply.strip()
        call = parse_call(reply)
        if call is None:
            self.answer, self.done = reply, True
            return
        res = call_tool(self.task, call["name"], call.get("arguments", {}))
        self.calls.append({"tool": call["name"], "arguments": call.get("arguments"), **res})
        log(f"episode {self.index}: {call['name']}({json.dumps(call.get('arguments'), default=str)}) -> "
            + ("ok" if res["ok"] else f"error: {res['error']}") + f" in {res['seconds']} s")
        if res.get("fatal"):
            self.reason, self.done = res["error"], True
            return
        shown = json.dumps(res["result"], default=str) if res["ok"] else f"error: {res['error']}"
        self.turns.append((reply, shown[:RESULT_CHARS]))
        if len(self.turns) >= self.task.max_steps:
            self.reason, self.done = f"no answer within {self.task.max_steps} steps", True

    @property
    def success(self) -> bool:
        return self.done and self.reason is None and judge(self.task, self.index, self.answer, self.calls)[0]

    def result(self) -> dict:
        ok, why = judge(self.task, self.index, self.answer, self.calls) if self.reason is None else (False, self.reason)
        return {"episode": self.index, "goal": self.goal, "answer": self.answer, "calls": self.calls,
                "steps": len(self.turns) + (self.answer is not None), "success": ok, "reason": why}


def judge(task: Task, index: int, answer: str | None, calls: list[dict]) -> tuple[bool, str | None]:
    """The task's success check on a finished episode: (success, reason it failed)."""
    ep = task.episodes[index]
    if answer is None:
        return False, "no answer"
    if want := task.success.get("answer_contains"):
        want = want.format(**ep.get("vars", {}), expect=ep.get("expect", ""))
        if want.lower() not in answer.lower():
            return False, "the answer does not contain what the task expects"
    if (tool := task.success.get("tool_called")) and not any(c["tool"] == tool and c["ok"] for c in calls):
        return False, f"{tool} was never called successfully"
    return True, None


def run_episode(task: Task, complete, index: int, log=lambda line: None) -> dict:
    """One episode: at most max_steps model turns; `complete(prompt) -> text` is the model."""
    ep = Episode(task, index)
    while not ep.done:
        ep.step(complete(ep.prompt()), log)
    return ep.result()
