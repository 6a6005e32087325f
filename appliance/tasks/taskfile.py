"""Task files: find one, parse it, validate it (every problem as FILE:LINE: what), build the Task.

    load(ref) = build(checked(parse(find(ref))))

`parse` reads the TOML and notes where each table sits; `validate` returns every problem at once, each
with its place in the file, as eval suites do; `build` turns a valid file into a `Task` whose sha256 covers
the file and the source of its tool modules (what a run used, exactly).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance import refs
from appliance.errors import UsageError
from appliance.toml_lines import TomlLines, decode_error

TASKS_DIR = refs.TASKS_DIR  # shipped tasks (`appliance.refs` finds them)
SPLITS = ("train", "validation")
TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}  # a tool argument's declared type
TABLES = ("task", "tool", "episode", "success")
CHECKS = ("answer_contains", "answer_regex", "tool_called")  # the keys of [success]
EPISODE_KEYS = ("vars", "expect", "split")
DEFAULT_MAX_STEPS, DEFAULT_TOOL_TIMEOUT = 4, 5.0


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
    max_steps: int = DEFAULT_MAX_STEPS
    tool_timeout: float = DEFAULT_TOOL_TIMEOUT
    path: str = ""
    paths: list[str] = field(default_factory=list)  # where the tool modules are imported from
    sha256: str = ""
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (file, source) as hashed

    def indexes(self, split: str | None = None) -> list[int]:
        """Episode numbers (0-based) of a split, or all of them."""
        return [i for i, ep in enumerate(self.episodes) if split is None or ep.get("split", "train") == split]


@dataclass
class TaskFile:
    """A task file as read: where it is, its bytes (hashed), its TOML, and the line of each table and key."""

    path: Path
    data: bytes
    raw: dict
    lines: TomlLines


def find(ref: str | Path) -> Path:
    """A shipped task by name, or a TOML file: `appliance.refs.task`."""
    return refs.task(ref)


def shipped_names() -> list[str]:
    return sorted(f.stem for f in TASKS_DIR.glob("*.toml"))


def is_task_file(path: Path) -> bool:
    """Whether a TOML file is a task (it has a [task] table) rather than an eval suite."""
    try:
        return "task" in tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def load(ref: str | Path) -> Task:
    """A checked task; every problem is listed at once, each with its place in the file."""
    tf = parse(find(ref))
    if problems := validate(tf):
        raise UsageError(f"{len(problems)} problem(s) in task {tf.path}: " + "; ".join(problems),
                         "fix the task file (see docs/EVAL.md, agentic tasks)")
    return build(tf)


def parse(path: Path) -> TaskFile:
    """Read a task file; UsageError when it cannot be read or is not TOML (with FILE:LINE)."""
    try:
        data = Path(path).read_bytes()
        text = data.decode()
        raw = tomllib.loads(text)
    except OSError as e:
        raise UsageError(f"cannot read task file {path}: {e.strerror or e}",
                         "pass an existing task TOML file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"task {path} is not valid TOML: {e}", "fix the file and run again") from None
    except tomllib.TOMLDecodeError as e:
        line, what = decode_error(e)
        raise UsageError(f"task {path}:{line}: not valid TOML ({what})", "fix the file and run again") from None
    return TaskFile(Path(path), data, raw, TomlLines(text))


# --- validate: one function per table; each reports through bad(line, message) ------------------------
Bad = Callable[[int, str], None]


def validate(tf: TaskFile) -> list[str]:
    """Every problem of a parsed task file, each as "FILE:LINE: what"; empty when the file is valid."""
    problems: list[str] = []

    def bad(line: int, msg: str) -> None:
        problems.append(f"{tf.path}:{line}: {msg}")

    where = tf.lines
    for k in sorted(set(tf.raw) - set(TABLES)):
        bad(_line_of(where, k), f"unknown table [{k}] (tables: [task], [[tool]], [[episode]], [success])")
    head = _table(tf, "task", bad)
    goal, max_steps = _check_head(head, where, bad)
    tools = _check_tools(_tables(tf, "tool", bad), where, bad)
    episodes = _tables(tf, "episode", bad)
    if not episodes:
        bad(1, "at least one [[episode]] is required")
    success = _check_success(_table(tf, "success", bad), tools, max_steps, where, bad)
    for i, ep in enumerate(episodes):
        _check_episode(ep, i, goal, success, where, bad)
    return problems


def _line_of(where: TomlLines, name: str) -> int:
    """A table's header, or the top-level `name = ...` written where a table belongs."""
    return where.of(name) if name in where.heads else where.of("", key=name)


def _table(tf: TaskFile, key: str, bad: Bad) -> dict:
    v = tf.raw.get(key, {})
    if not isinstance(v, dict):
        bad(_line_of(tf.lines, key), f"[{key}] must be a table")
        return {}
    return v


def _tables(tf: TaskFile, key: str, bad: Bad) -> list[dict]:
    v = tf.raw.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        bad(_line_of(tf.lines, key), f"write [[{key}]] (an array of tables), not {key} = ...")
        return []
    return v


def _check_head(t: dict, where: TomlLines, bad: Bad) -> tuple[str, int]:
    """[task]: name, goal, max_steps, tool_timeout. Returns the goal and max_steps later checks build on."""
    name, goal = t.get("name"), t.get("goal")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name or ""):
        bad(where.of("task", 0, "name"), "[task] name must be lowercase letters, digits, '.', '_' or '-'")
    if not isinstance(goal, str) or not goal.strip():
        bad(where.of("task", 0, "goal"), "[task] goal is required (a string)")
        goal = ""
    max_steps, timeout = t.get("max_steps", DEFAULT_MAX_STEPS), t.get("tool_timeout", DEFAULT_TOOL_TIMEOUT)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not 1 <= max_steps <= 50:
        bad(where.of("task", 0, "max_steps"), "[task] max_steps must be an integer from 1 to 50")
        max_steps = DEFAULT_MAX_STEPS
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 600:
        bad(where.of("task", 0, "tool_timeout"), "[task] tool_timeout must be a number of seconds in (0, 600]")
    return goal, max_steps


def _check_tools(tables: list[dict], where: TomlLines, bad: Bad) -> set[str]:
    """[[tool]]: an identifier, module:function, typed args. Returns the names declared."""
    names: set[str] = set()
    for i, tr in enumerate(tables):
        label = f"[[tool]] #{i + 1}"
        tname, fn, args = tr.get("name"), tr.get("function"), tr.get("args", {})
        if not isinstance(tname, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tname or ""):
            bad(where.of("tool", i, "name"), f"{label}: name must be an identifier")
            continue
        if tname in names:
            bad(where.of("tool", i, "name"), f"{label}: tool {tname} is declared twice")
        if not isinstance(fn, str) or not re.fullmatch(r"[\w.]+:\w+", fn or ""):
            bad(where.of("tool", i, "function"), f"{label} ({tname}): function must be module:function")
        if not isinstance(args, dict) or any(not isinstance(v, str) or v not in TYPES for v in args.values()):
            bad(where.of("tool", i, "args"), f"{label} ({tname}): args maps each argument to one of "
                                             f"{', '.join(TYPES)}")
        names.add(tname)
    if not names:
        bad(1, "at least one [[tool]] is required")
    return names


def _check_success(success: dict, tools: set[str], max_steps: int, where: TomlLines, bad: Bad) -> dict:
    """[success]: at least one known check, each a non-empty string. Returns the well-formed checks."""
    if not set(success) & set(CHECKS) or set(success) - set(CHECKS):
        bad(where.of("success"), "[success] takes answer_contains, answer_regex and/or tool_called")
    kept = {}
    for k in CHECKS:
        if k not in success:
            continue
        if not isinstance(success[k], str) or not success[k].strip():
            bad(where.of("success", 0, k), f"[success] {k} must be a non-empty string")
        else:
            kept[k] = success[k]
    if (called := kept.get("tool_called")) and called not in tools:
        bad(where.of("success", 0, "tool_called"),
            f"[success] tool_called names {called!r}, which is not a declared tool")
    if called and max_steps < 2:
        bad(where.of("success", 0, "tool_called"),
            "[success] tool_called needs [task] max_steps of at least 2 (a call, then the answer)")
    return kept


def _check_episode(ep: dict, i: int, goal: str, success: dict, where: TomlLines, bad: Bad) -> None:
    """One [[episode]]: its keys, and that the goal and success checks fill from its vars and expect."""
    label = f"[[episode]] #{i + 1}"
    vars_ = ep.get("vars", {})
    if not isinstance(vars_, dict):
        bad(where.of("episode", i, "vars"), f"{label}: vars must be a table")
        return
    if extra := sorted(set(ep) - set(EPISODE_KEYS)):
        bad(where.of("episode", i, extra[0]), f"{label}: unknown key(s) {', '.join(extra)} "
                                              f"(keys: {', '.join(EPISODE_KEYS)})")
    if "expect" in vars_:
        bad(where.of("episode", i, "vars"), f"{label}: 'expect' is the episode's own key, not a var")
        return
    expect = ep.get("expect", "")
    if not isinstance(expect, str):
        bad(where.of("episode", i, "expect"), f"{label}: expect must be a string")
        return
    if ep.get("split", "train") not in SPLITS:
        bad(where.of("episode", i, "split"), f"{label}: split must be train or validation")
    for what in ("goal", "answer_contains", "answer_regex"):
        text = goal if what == "goal" else success.get(what)
        if not text:
            continue
        line = where.of("episode", i)
        try:
            filled = text.format(**vars_, expect=expect)
        except Exception as e:  # noqa: BLE001 - KeyError, IndexError, AttributeError...: all the same to the operator
            bad(line, f"{label}: the {what} cannot be filled from the episode ({type(e).__name__}: {e})")
            continue
        if what != "goal" and not filled.strip():
            bad(line, f"{label}: the {what} is empty for this episode (give it an expect)")
        if what == "answer_regex":
            try:
                re.compile(fill_regex(text, vars_, expect))
            except re.error as e:
                bad(line, f"{label}: answer_regex is not a valid regex: {e}")


def fill_regex(template: str, vars_: dict, expect: str) -> str:
    """answer_regex with the episode's values filled in literally (escaped)."""
    return template.format(**{k: re.escape(str(v)) for k, v in vars_.items()}, expect=re.escape(expect))


# --- build ---------------------------------------------------------------------------------------------
def build(tf: TaskFile) -> Task:
    """The Task of a valid file; its sha256 covers the file and the source of every tool module beside it."""
    t, raw = tf.raw["task"], tf.raw
    tools = {tr["name"]: Tool(tr["name"], tr["function"], str(tr.get("description", "")), dict(tr.get("args", {})))
             for tr in raw["tool"]}
    paths = [str(tf.path.resolve().parent)]
    digest = hashlib.sha256(tf.data)
    sources: dict[str, tuple[str, str]] = {}
    for tool in sorted(tools.values(), key=lambda x: x.name):  # the tools' code is part of what a run used
        modname = tool.function.split(":")[0]
        module = Path(paths[0]) / (modname.replace(".", "/") + ".py")
        if module.is_file():
            code = module.read_bytes()
            digest.update(code)
            sources.setdefault(modname, (str(module), code.decode("utf-8", "replace")))
    return Task(t["name"], t["goal"], tools, raw["episode"], raw["success"],
                t.get("max_steps", DEFAULT_MAX_STEPS), float(t.get("tool_timeout", DEFAULT_TOOL_TIMEOUT)),
                str(tf.path), paths, digest.hexdigest(), sources)
