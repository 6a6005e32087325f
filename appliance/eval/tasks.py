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

    [success]
    answer_contains = "{expect}"                           # and/or tool_called = "lookup_asset"

Each turn the model either calls one tool, as a JSON object {"name": ..., "arguments": {...}} on its own,
or answers. A call is checked against the declared arguments and run in a sandbox: a separate Python
process with no secrets in its environment, a private working directory, memory and CPU limits and a
wall-clock timeout. A tool that raises, hangs or returns something that is not JSON ends as an error the
model sees; the episode goes on. Every call is logged with its arguments, outcome and time.
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


def load(path: Path) -> Task:
    """A checked task; every problem is listed at once, each with its place in the file."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"no task file {path}", "pass an existing task TOML file") from None
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
        for text, what in ((goal or "", "goal"), (str(success.get("answer_contains", "")), "answer_contains")):
            try:
                text.format(**ep.get("vars", {}), expect=ep.get("expect", ""))
            except (KeyError, IndexError, ValueError) as e:
                problems.append(f"[[episode]] #{i}: the {what} needs {e} and the episode does not give it")
    if problems:
        raise UsageError(f"task {path} has {len(problems)} problem(s): " + "; ".join(problems),
                         "fix the task file (see docs/EVAL.md, agentic tasks)")
    return Task(name, goal, tools, episodes, success, max_steps, float(timeout), str(path),
                [str(Path(path).resolve().parent)])


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
            return done(ok=False, error=f"the tool did not answer within {task.tool_timeout:g} s")
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return done(ok=False, error=f"the tool failed: {last[:300]}")
    if not isinstance(out, dict) or "ok" not in out:
        return done(ok=False, error="the tool's sandbox answered nonsense")
    return done(**out)


# --- episodes ------------------------------------------------------------------------------------------
PROTOCOL = ("You can use these tools. To call one, reply with only a JSON object "
            '{"name": TOOL, "arguments": {...}}. When you know the answer, reply with it in plain words.')


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
    history = "".join(f"\nYou: {said}\nTool result: {result}" for said, result in turns)
    return f"{PROTOCOL}\n{tools}\n\nTask: {goal}{history}"


def run_episode(task: Task, complete, index: int, log=lambda line: None) -> dict:
    """One episode: at most max_steps model turns; `complete(prompt) -> text` is the model."""
    ep = task.episodes[index]
    vars_, expect = ep.get("vars", {}), ep.get("expect", "")
    goal = task.goal.format(**vars_, expect=expect)
    turns: list[tuple[str, str]] = []
    calls: list[dict] = []
    answer, reason = None, None
    for _ in range(task.max_steps):
        reply = complete(prompt_for(task, goal, turns)).strip()
        call = parse_call(reply)
        if call is None:
            answer = reply
            break
        res = call_tool(task, call["name"], call.get("arguments", {}))
        calls.append({"tool": call["name"], "arguments": call.get("arguments"), **res})
        log(f"episode {index}: {call['name']}({json.dumps(call.get('arguments'))}) -> "
            + ("ok" if res["ok"] else f"error: {res['error']}") + f" in {res['seconds']} s")
        turns.append((reply, json.dumps({k: v for k, v in res.items() if k != "seconds"}, default=str)))
    else:
        reason = f"no answer within {task.max_steps} steps"
    success = answer is not None
    if success and (want := task.success.get("answer_contains")):
        success = want.format(**vars_, expect=expect).lower() in answer.lower()
        reason = None if success else "the answer does not contain what the task expects"
    if success and (tool := task.success.get("tool_called")):
        success = any(c["tool"] == tool and c["ok"] for c in calls)
        reason = None if success else f"{tool} was never called successfully"
    return {"episode": index, "goal": goal, "answer": answer, "calls": calls,
            "steps": len(turns) + (answer is not None), "success": success, "reason": reason}
