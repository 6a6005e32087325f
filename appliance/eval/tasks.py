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
    answer_contains = "{expect}"      # whole words, case-blind; or answer_regex (the whole answer); and/or
    tool_called = "lookup_asset"      # a successful call of this tool

Each turn the model either calls one tool, as a JSON object {"name": ..., "arguments": {...}} on its own,
or answers. A call is checked against the declared arguments and run in a sandbox: a separate `python -I`
process in a session of its own, with no secrets in its environment, a private working directory, limits
on address space (1 GiB), CPU seconds and core dumps, a wall-clock timeout after which its whole process
group is killed, and its prints kept apart from its result. The process that runs tools makes itself
non-dumpable, so a tool cannot read the passphrase or keys from its /proc files. When the appliance runs
as root (as CI does), root may read any process's memory whatever its dumpable flag, so the sandbox drops
to the unprivileged `nobody` (no supplementary groups, PR_SET_NO_NEW_PRIVS) before the tool's code runs,
in a working directory of its own. The tool's module source is read by the appliance and handed over on
stdin, so the code hashed into the task's sha256 is the code that runs, and a checkout or task folder
under a 0700 directory still works; the sandbox runs the first Python that user can execute (ours, the one
it was made from, the system's python3: with the last two a tool has the standard library only).
Otherwise a tool runs as the appliance's user: what it can reach on disk is what that user can; tools are
the site's own code, to be reviewed like it. A tool that raises, or a call with a wrong name or arguments,
is an error the model sees, and the episode goes on (it may call again). A tool that hangs past its
timeout, or whose sandbox dies (out of memory, a crash), ends the episode as failed with that reason.
Every call is kept with its arguments, outcome and time: in the eval run's cases, and counted in a
training run's summary.

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
from appliance.hardening import protect_process

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
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (file, source) as hashed

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

    def table(key: str) -> dict:
        v = raw.get(key, {})
        if not isinstance(v, dict):
            problems.append(f"[{key}] must be a table")
            return {}
        return v

    def tables(key: str) -> list[dict]:
        v = raw.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            problems.append(f"write [[{key}]] (an array of tables), not {key} = ...")
            return []
        return v

    for k in sorted(set(raw) - {"task", "tool", "episode", "success"}):
        problems.append(f"unknown table [{k}] (tables: [task], [[tool]], [[episode]], [success])")
    t = table("task")
    name, goal = t.get("name"), t.get("goal")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name or ""):
        problems.append("[task] name must be lowercase letters, digits, '.', '_' or '-'")
    if not isinstance(goal, str) or not goal.strip():
        problems.append("[task] goal is required (a string)")
        goal = ""
    max_steps, timeout = t.get("max_steps", 4), t.get("tool_timeout", 5.0)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not 1 <= max_steps <= 50:
        problems.append("[task] max_steps must be an integer from 1 to 50")
        max_steps = 4
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 600:
        problems.append("[task] tool_timeout must be a number of seconds in (0, 600]")
        timeout = 5.0
    tools: dict[str, Tool] = {}
    for i, tr in enumerate(tables("tool"), 1):
        where = f"[[tool]] #{i}"
        tname, fn, args = tr.get("name"), tr.get("function"), tr.get("args", {})
        if not isinstance(tname, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tname or ""):
            problems.append(f"{where}: name must be an identifier")
            continue
        if tname in tools:
            problems.append(f"{where}: tool {tname} is declared twice")
        if not isinstance(fn, str) or not re.fullmatch(r"[\w.]+:\w+", fn or ""):
            problems.append(f"{where} ({tname}): function must be module:function")
            fn = ""
        if not isinstance(args, dict) or any(not isinstance(v, str) or v not in TYPES for v in args.values()):
            problems.append(f"{where} ({tname}): args maps each argument to one of {', '.join(TYPES)}")
            args = {}
        tools[tname] = Tool(tname, fn, str(tr.get("description", "")), dict(args))
    if not tools:
        problems.append("at least one [[tool]] is required")
    episodes = tables("episode")
    if not episodes:
        problems.append("at least one [[episode]] is required")
    success = table("success")
    checks = {"answer_contains", "answer_regex", "tool_called"}
    if not set(success) & checks or set(success) - checks:
        problems.append("[success] takes answer_contains, answer_regex and/or tool_called")
    for k in ("answer_contains", "answer_regex", "tool_called"):
        if k in success and (not isinstance(success[k], str) or not success[k].strip()):
            problems.append(f"[success] {k} must be a non-empty string")
            success.pop(k)
    if (called := success.get("tool_called")) and called not in tools:
        problems.append(f"[success] tool_called names {called!r}, which is not a declared tool")
    if called and max_steps < 2:
        problems.append("[success] tool_called needs [task] max_steps of at least 2 (a call, then the answer)")
    for i, ep in enumerate(episodes, 1):
        vars_ = ep.get("vars", {})
        if not isinstance(vars_, dict):
            problems.append(f"[[episode]] #{i}: vars must be a table")
            continue
        if extra := sorted(set(ep) - {"vars", "expect", "split"}):
            problems.append(f"[[episode]] #{i}: unknown key(s) {', '.join(extra)} (keys: vars, expect, split)")
        if "expect" in vars_:
            problems.append(f"[[episode]] #{i}: 'expect' is the episode's own key, not a var")
            continue
        if not isinstance(ep.get("expect", ""), str):
            problems.append(f"[[episode]] #{i}: expect must be a string")
            continue
        if ep.get("split", "train") not in SPLITS:
            problems.append(f"[[episode]] #{i}: split must be train or validation")
        for what in ("goal", "answer_contains", "answer_regex"):
            text = goal if what == "goal" else success.get(what)
            if not text:
                continue
            try:
                filled = text.format(**vars_, expect=ep.get("expect", ""))
            except Exception as e:  # noqa: BLE001 - KeyError, IndexError, AttributeError...: all the same to the operator
                problems.append(f"[[episode]] #{i}: the {what} cannot be filled from the episode ({type(e).__name__}: "
                                f"{e})")
                continue
            if what != "goal" and not filled.strip():
                problems.append(f"[[episode]] #{i}: the {what} is empty for this episode (give it an expect)")
            if what == "answer_regex":
                try:
                    re.compile(_regex(text, vars_, ep.get("expect", "")))
                except re.error as e:
                    problems.append(f"[[episode]] #{i}: answer_regex is not a valid regex: {e}")
    if problems:
        raise UsageError(f"task {path} has {len(problems)} problem(s): " + "; ".join(problems),
                         "fix the task file (see docs/EVAL.md, agentic tasks)")
    paths = [str(Path(path).resolve().parent)]
    digest = hashlib.sha256(data)
    sources: dict[str, tuple[str, str]] = {}
    for tool in sorted(tools.values(), key=lambda x: x.name):  # the tools' code is part of what a run used
        modname = tool.function.split(":")[0]
        module = Path(paths[0]) / (modname.replace(".", "/") + ".py")
        if module.is_file():
            code = module.read_bytes()
            digest.update(code)
            sources.setdefault(modname, (str(module), code.decode("utf-8", "replace")))
    return Task(name, goal, tools, episodes, success, max_steps, float(timeout), str(path), paths, digest.hexdigest(),
                sources)


def _regex(template: str, vars_: dict, expect: str) -> str:
    """answer_regex with the episode's values filled in literally (escaped)."""
    return template.format(**{k: re.escape(str(v)) for k, v in vars_.items()}, expect=re.escape(expect))


# --- the sandbox ---------------------------------------------------------------------------------------
_RUNNER = r"""
import ctypes, importlib, json, os, resource, sys, types
try:  # PR_SET_NO_NEW_PRIVS: no setuid program hands privileges back to the tool
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
except (OSError, AttributeError):
    pass
limit, cpu = int(sys.argv[2]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
sys.path[:0] = json.loads(sys.argv[3])
out_fd = os.dup(1)
os.dup2(2, 1)  # what the tool prints goes to stderr; stdout carries only the result
mod, fn = sys.argv[1].split(":")
payload = json.loads(sys.stdin.read())
args, source = payload["args"], payload.get("source")
try:
    if source:  # the module's code as the appliance read (and hashed) it
        m = types.ModuleType(mod)
        m.__file__ = source[0]
        sys.modules[mod] = m
        exec(compile(source[1], source[0], "exec"), m.__dict__)
    else:
        m = importlib.import_module(mod)
    out = getattr(m, fn)(**args)
    text = json.dumps({"ok": True, "result": out})
except Exception as e:
    text = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
os.write(out_fd, text.encode())
"""


SANDBOX_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_pythons: dict[tuple[int, int] | None, str | None] = {}


def sandbox_ids() -> tuple[int, int] | None:
    """(uid, gid) the sandbox drops to: `nobody`'s when this process is root (root may read any process's
    memory, dumpable or not), else None (the tool runs as this user; key holders are non-dumpable)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _drop(ids: tuple[int, int] | None) -> dict:
    return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}


def sandbox_python(ids: tuple[int, int] | None) -> str | None:
    """The interpreter the sandbox runs: ours, or (when `ids` cannot run it, e.g. it lives under a 0700
    folder) the one it was made from or the system's python3; None when that user can run none."""
    if ids is None:
        return sys.executable
    if ids not in _pythons:
        import shutil

        found = None
        for cand in dict.fromkeys(c for c in (sys.executable, os.path.realpath(sys.executable),
                                             getattr(sys, "_base_executable", ""),
                                             shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")) if c):
            try:
                r = subprocess.run([cand, "-I", "-c", "import ctypes, json, resource, types"], env=SANDBOX_ENV,
                                   cwd="/", capture_output=True, timeout=30, **_drop(ids))
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                found = cand
                break
        _pythons[ids] = found
    return _pythons[ids]


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
    protect_process()  # the tool may not read this process's /proc files (it may hold the keys)
    ids = sandbox_ids()  # as root: the tool runs as nobody, so root's reach is not the tool's
    python = sandbox_python(ids)
    if python is None:
        return done(ok=False, fatal=True, error=f"{name}'s sandbox did not start: no Python that the unprivileged "
                                                f"user {ids[0]} can run (install a system python3)")
    source = task.sources.get(tool.function.split(":")[0])
    with tempfile.TemporaryDirectory(prefix="appliance-tool-") as cwd:
        if ids:
            os.chown(cwd, *ids)  # the tool's private working directory is its own
        try:
            proc = subprocess.Popen([python, "-I", "-c", _RUNNER, tool.function, str(SANDBOX_MEMORY),
                                     json.dumps(task.paths), str(int(task.tool_timeout) + 1)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=dict(SANDBOX_ENV), start_new_session=True, **_drop(ids))
        except OSError as e:
            return done(ok=False, fatal=True, error=f"{name}'s sandbox did not start: {e.strerror or e}")
        try:
            raw_out, raw_err = proc.communicate(json.dumps({"args": arguments, "source": source}).encode(),
                                                timeout=task.tool_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return done(ok=False, fatal=True, error=f"{name} did not answer within {task.tool_timeout:g} s")
        _kill_group(proc)  # anything the tool left running
    stdout, stderr = raw_out.decode("utf-8", "replace"), raw_err.decode("utf-8", "replace")
    try:
        out = json.loads(stdout)
    except ValueError:
        last = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return done(ok=False, fatal=True, error=f"{name}'s sandbox failed: {last[:300]}")
    if not isinstance(out, dict) or "ok" not in out:
        return done(ok=False, fatal=True, error=f"{name}'s sandbox answered nonsense")
    return done(**out)


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


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

    def fail(self, reason: str) -> None:
        self.reason, self.done = reason, True

    @property
    def success(self) -> bool:
        return self.done and self.reason is None and judge(self.task, self.index, self.answer, self.calls)[0]

    def result(self) -> dict:
        ok, why = judge(self.task, self.index, self.answer, self.calls) if self.reason is None else (False, self.reason)
        return {"episode": self.index, "goal": self.goal, "answer": self.answer, "calls": self.calls,
                "steps": len(self.turns) + (self.answer is not None), "success": ok, "reason": why}


def judge(task: Task, index: int, answer: str | None, calls: list[dict]) -> tuple[bool, str | None]:
    """The task's success check on a finished episode: (success, reason it failed).

    answer_contains matches whole words, case-blind ("low" is not in "below"); answer_regex must match the
    whole answer (stripped, case-blind), with the episode's values filled in literally.
    """
    ep = task.episodes[index]
    vars_, expect = ep.get("vars", {}), ep.get("expect", "")
    if answer is None:
        return False, "no answer"
    if want := task.success.get("answer_contains"):
        want = want.format(**vars_, expect=expect)
        if not re.search(rf"(?<!\w){re.escape(want)}(?!\w)", answer, re.IGNORECASE):
            return False, "the answer does not contain what the task expects"
    if pattern := task.success.get("answer_regex"):
        if not re.fullmatch(_regex(pattern, vars_, expect), answer.strip(), re.IGNORECASE | re.DOTALL):
            return False, "the answer does not match the task's answer_regex"
    if (tool := task.success.get("tool_called")) and not any(c["tool"] == tool and c["ok"] for c in calls):
        return False, f"{tool} was never called successfully"
    return True, None


def run_episode(task: Task, complete, index: int, log=lambda line: None) -> dict:
    """One episode: at most max_steps model turns; `complete(prompt) -> text` is the model."""
    ep = Episode(task, index)
    while not ep.done:
        try:
            reply = complete(ep.prompt())
        except Exception as e:  # noqa: BLE001 - e.g. the history outgrew the model's context: this episode fails
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            ep.fail(f"the model failed: {type(e).__name__}" + (f": {first}" if first else ""))
            break
        ep.step(reply, log)
    return ep.result()
