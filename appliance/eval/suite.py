"""Evaluation suites: small TOML files of cases and dataset-level metrics, checked with file and line.

```toml
[suite]
name = "handbook-checks"
max_tokens = 32                 # generation length for cases (default 32)

[[case]]
id = "tarn-valve"
prompt = "What does the tarn valve do?"
chat = true                     # render with the model's chat template
expect = "contains"             # exact | contains | regex | json | json_schema | choice
answer = "secondary coolant"    # choice: one of `choices`, scored by log-likelihood

[[metric]]
type = "perplexity"             # perplexity | vocab_coverage | latency | custom | task
dataset = "handbook@2"
max = 80.0                      # thresholds: max / min (latency: max_p95_ms, max_ttft_ms, min_tokens_per_s)

[[metric]]
type = "task"                   # an agentic task's completion rate (see appliance/tasks/)
task = "asset-risk"             # a shipped task, or a task TOML file (relative to this suite)
split = "validation"            # its episodes of one split (default: all)
max_tokens = 64                 # longest model turn
min = 0.5
```
A task file can also be run as a suite of its own: `appliance eval run TASK.toml --model M`.
Every problem is reported at once, each as `FILE:LINE: what is wrong`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance import refs, tasks
from appliance.errors import ApplianceError, UsageError
from appliance.toml_lines import TomlLines, decode_error


class SuiteError(ApplianceError):
    """A suite file with problems; the message lists each with FILE:LINE."""

SUITES_DIR = refs.SUITES_DIR  # shipped suites (`appliance.refs` finds them)
EXPECTS = ("exact", "contains", "regex", "json", "json_schema", "choice")
METRICS = ("perplexity", "vocab_coverage", "latency", "custom", "task")
THRESHOLDS = {"perplexity": ("max",), "vocab_coverage": ("min",), "custom": ("min", "max"), "task": ("min",),
              "latency": ("max_p95_ms", "max_ttft_ms", "min_tokens_per_s")}


@dataclass
class Case:
    id: str
    prompt: str
    expect: str
    answer: str = ""
    choices: list[str] = field(default_factory=list)
    schema: dict | None = None
    chat: bool = False
    max_tokens: int = 32
    line: int = 0


@dataclass
class Metric:
    type: str
    dataset: str = ""
    name: str = ""  # custom: the registered function
    thresholds: dict = field(default_factory=dict)
    tokens: int = 2048  # perplexity: held-out tokens measured
    line: int = 0
    key: str = ""  # the name its value is reported under (set when the suite is loaded)
    task: str = ""  # task: the task file, resolved
    split: str = ""  # task: the episodes of one split ("" for all)
    max_tokens: int = 64  # task: longest model turn


@dataclass
class Suite:
    name: str
    path: str
    cases: list[Case]
    metrics: list[Metric]
    description: str = ""


def find(ref: str) -> Path:
    """A shipped suite (or task) by name, or a TOML file: `appliance.refs.suite_file`."""
    return refs.suite_file(ref)


def load(ref: str) -> Suite:
    """Read and check a suite; raise one UsageError listing every problem with FILE:LINE."""
    from appliance.eval.metrics import REGISTRY

    path = find(ref)
    if tasks.is_task_file(path):  # a task on its own: a suite of its completion rate
        task = tasks.load(path)
        m = Metric("task", line=1, key="task_completion", task=str(path))
        return Suite(task.name, str(path), [], [m], f"completion rate of task {task.name} "
                                                    f"({len(task.episodes)} episodes)")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, what = decode_error(e)
        raise SuiteError(f"{path}:{line}: not valid TOML ({what})",
                         "fix the file and run again") from None
    where = TomlLines(text)
    problems: list[str] = []

    def bad(line: int, msg: str) -> None:
        problems.append(f"{path}:{line}: {msg}")

    for k in set(raw) - {"suite", "case", "metric"}:
        bad(1, f"unknown table [{k}] (tables are [suite], [[case]], [[metric]])")
    head = raw.get("suite", {})
    if not isinstance(head, dict):
        bad(where.of("suite", 0), "[suite] must be a table")
        head = {}
    for k in set(head) - {"name", "description", "max_tokens"}:
        bad(where.of("suite", 0, k), f"[suite] has unknown key {k!r} (keys: description, max_tokens, name)")
    max_tokens = head.get("max_tokens", 32)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        bad(where.of("suite", 0, "max_tokens"), "suite.max_tokens must be an integer from 1 to 4096")
        max_tokens = 32
    for table in ("case", "metric"):
        if table in raw and not (isinstance(raw[table], list) and all(isinstance(x, dict) for x in raw[table])):
            bad(where.of(table, 0), f"write [[{table}]] (an array of tables), not [{table}]")
            raw[table] = []
    cases, seen = [], set()
    for i, c in enumerate(raw.get("case", [])):
        cases.append(_case(c, i, where, bad, seen, max_tokens))
    metrics = [_metric(m, i, where, bad, REGISTRY, path) for i, m in enumerate(raw.get("metric", []))]
    if not cases and not metrics:
        bad(1, "the suite has no [[case]] and no [[metric]]")
    _name_metrics(metrics)
    seen_keys: set[str] = set()
    for m in metrics:
        if m.type == "task" and m.key in seen_keys:
            bad(m.line, f"task {m.name} ({m.split or 'all episodes'}) is measured twice in this suite")
        seen_keys.add(m.key)
    if problems:
        raise SuiteError(f"{len(problems)} problem(s) in the suite: " + "; ".join(problems),
                         "fix them and run again")
    return Suite(str(head.get("name") or path.stem), str(path), cases, metrics, str(head.get("description", "")))


def _case(c: dict, i: int, where: TomlLines, bad, seen: set, max_tokens: int) -> Case:
    known = {"id", "prompt", "expect", "answer", "choices", "schema", "chat", "max_tokens"}
    for k in set(c) - known:
        bad(where.of("case", i, k), f"case has unknown key {k!r} (keys: {', '.join(sorted(known))})")
    cid = str(c.get("id") or f"case-{i + 1}")
    if cid in seen:
        bad(where.of("case", i, "id"), f"case id {cid!r} is used twice")
    seen.add(cid)
    prompt = c.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        bad(where.of("case", i, "prompt"), f"case {cid}: prompt must be a non-empty string")
    expect = c.get("expect", "contains")
    if expect not in EXPECTS:
        bad(where.of("case", i, "expect"), f"case {cid}: expect {expect!r} is not one of {', '.join(EXPECTS)}")
    answer = c.get("answer")
    choices = c.get("choices", [])
    schema = c.get("schema")
    if expect in ("exact", "contains", "regex", "choice") and (
            not isinstance(answer, str | int | float) or isinstance(answer, bool) or str(answer) == ""):
        bad(where.of("case", i, "answer"), f"case {cid}: a non-empty answer is required for expect = {expect!r}")
    answer = "" if answer is None else answer
    if expect == "regex":
        try:
            re.compile(str(answer))
        except re.error as e:
            bad(where.of("case", i, "answer"), f"case {cid}: answer is not a valid regex ({e})")
    if expect == "choice" and (not isinstance(choices, list) or len(choices) < 2 or str(answer) not in choices):
        bad(where.of("case", i, "choices"), f"case {cid}: choice needs at least 2 choices and the answer among them")
    if expect == "json_schema":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                bad(where.of("case", i, "schema"), f"case {cid}: schema is not valid JSON ({e})")
        if not isinstance(schema, dict):
            bad(where.of("case", i, "schema"), f"case {cid}: json_schema needs a schema (a table or JSON text)")
        else:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as e:
                bad(where.of("case", i, "schema"), f"case {cid}: schema is not a valid JSON Schema ({e.message})")
    mt = c.get("max_tokens", max_tokens)
    return Case(cid, str(prompt or ""), str(expect), str(answer), [str(x) for x in choices or []],
                schema if isinstance(schema, dict) else None, bool(c.get("chat", False)),
                mt if isinstance(mt, int) and mt > 0 else max_tokens, where.of("case", i))


def _metric(m: dict, i: int, where: TomlLines, bad, registry: dict, path: Path) -> Metric:
    kind = m.get("type")
    if kind not in METRICS:
        bad(where.of("metric", i, "type"), f"metric type {kind!r} is not one of {', '.join(METRICS)}")
        return Metric(str(kind))
    if kind == "task":
        return _task_metric(m, i, where, bad, path)
    allowed = {"type", "dataset", "name", "tokens", *THRESHOLDS[kind]}
    for k in set(m) - allowed:
        bad(where.of("metric", i, k), f"{kind} metric has unknown key {k!r} (keys: {', '.join(sorted(allowed))})")
    if kind in ("perplexity", "vocab_coverage") and not m.get("dataset"):
        bad(where.of("metric", i), f"{kind} needs dataset = \"NAME@N\" (its validation split is used)")
    name = str(m.get("name", ""))
    if kind == "custom" and name not in registry:
        known = ", ".join(sorted(registry)) or "none registered"
        bad(where.of("metric", i, "name"), f"unknown metric {name!r} (registered: {known})")
    thresholds = {k: m[k] for k in THRESHOLDS[kind] if k in m}
    for k, v in thresholds.items():
        if not isinstance(v, int | float) or isinstance(v, bool):
            bad(where.of("metric", i, k), f"{kind}.{k} must be a number")
    tokens = m.get("tokens", 2048)
    if not isinstance(tokens, int) or tokens < 16:
        bad(where.of("metric", i, "tokens"), f"{kind}.tokens must be an integer of at least 16")
        tokens = 2048
    return Metric(kind, str(m.get("dataset", "")), name, thresholds, tokens, where.of("metric", i))


def _task_metric(m: dict, i: int, where: TomlLines, bad, path: Path) -> Metric:
    allowed = {"type", "task", "split", "max_tokens", "min"}
    for k in set(m) - allowed:
        bad(where.of("metric", i, k), f"task metric has unknown key {k!r} (keys: {', '.join(sorted(allowed))})")
    ref = str(m.get("task", ""))
    if not ref:
        bad(where.of("metric", i), "task needs task = \"NAME\" (a shipped task) or a task TOML file")
        return Metric("task", line=where.of("metric", i))
    if ref.endswith(".toml") and not Path(ref).is_absolute() and (path.parent / ref).is_file():
        ref = str(path.parent / ref)
    try:
        task = tasks.load(ref)
    except UsageError as e:
        bad(where.of("metric", i, "task"), e.message)
        return Metric("task", line=where.of("metric", i))
    split = str(m.get("split", ""))
    if split and split not in tasks.SPLITS:
        bad(where.of("metric", i, "split"), "task.split must be train or validation")
    elif not task.indexes(split or None):
        bad(where.of("metric", i, "split"), f"task {task.name} has no {split} episodes")
    max_tokens = m.get("max_tokens", 64)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        bad(where.of("metric", i, "max_tokens"), "task.max_tokens must be an integer from 1 to 4096")
        max_tokens = 64
    thresholds = {k: m[k] for k in ("min",) if k in m}
    for k, v in thresholds.items():
        if not isinstance(v, int | float) or isinstance(v, bool):
            bad(where.of("metric", i, k), f"task.{k} must be a number")
    return Metric("task", "", task.name, thresholds, line=where.of("metric", i), task=task.path, split=split,
                  max_tokens=max_tokens)


def _name_metrics(metrics: list[Metric]) -> None:
    """A metric reports under its type (or custom name); when a type repeats, under TYPE:DATASET."""
    from collections import Counter

    counts = Counter(m.type for m in metrics if m.type != "custom")
    for m in metrics:
        if m.type == "task":  # under the task's name when a suite has several
            m.key = f"task_completion:{m.name}" + (f"/{m.split}" if m.split else "") if counts["task"] > 1 \
                else "task_completion"
            continue
        base = m.name if m.type == "custom" else m.type
        m.key = f"{base}:{m.dataset}" if m.type != "custom" and counts[m.type] > 1 else base


DATASET_REF = refs.DATASET_REF  # a dataset version as a suite: its default suite


def from_dataset(con, ref: str, n: int = 20) -> Suite:
    """The default suite of a dataset version: held-out perplexity, and cloze questions cut from its
    held-out documents (the sentence without its last word; the model must say the word)."""
    from appliance.vault.versions import iter_records

    version = refs.dataset(con, ref)
    name = refs.name_of(version)
    cases: list[Case] = []
    for split in ("validation", "train"):
        for rec in iter_records(con, version, split=split):
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(rec["text"].split())):
                words = sent.split()
                last = re.sub(r"[^\w-]", "", words[-1]) if words else ""
                if 6 <= len(words) <= 40 and len(last) >= 3 and last.isalpha():
                    cases.append(Case(f"cloze-{len(cases) + 1}", " ".join(words[:-1]), "contains", last,
                                      max_tokens=4))
                if len(cases) >= n:
                    break
            if len(cases) >= n:
                break
        if cases:
            break
    metrics = [Metric("perplexity", version, tokens=2048, key="perplexity")]
    return Suite(f"{name}-default", f"dataset:{version}", cases, metrics,
                 f"held-out perplexity and {len(cases)} cloze questions from {version}")
