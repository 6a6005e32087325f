"""Reward functions for `stage = "grpo"`: each scores one sampled answer in [0, 1].

A reward is `fn(completion, answer, cfg) -> float`: the model's answer text, the reference answer from
the data (empty when the table has none) and the recipe's [grpo] section. Built in:

- exact: the answer, ignoring case, surrounding space and a final full stop.
- overlap: word F1 between the answer and the reference (a dense signal for small models).
- regex: the answer contains a match of grpo.pattern.
- json_schema: the answer is JSON that validates against grpo.schema.
- tool_call: the answer is a JSON tool call {"name": ..., "arguments": {...}}, naming one of grpo.tools
  when that list is given.

Sites add their own with `@register("name")` in a module named in APPLIANCE_REWARD_PLUGINS (comma-separated
import paths). A reward that raises, or returns something other than a number in [0, 1], scores 0 for
that answer; the run goes on and its summary counts each failure with the first reason.
"""

from __future__ import annotations

import json
import math
import re

from appliance.plugins import Registry

REGISTRY = Registry("reward", "APPLIANCE_REWARD_PLUGINS")  # name -> fn(completion, answer, cfg) -> float
BUILTIN = ("exact", "overlap", "regex", "json_schema", "tool_call")
_WORD = re.compile(r"\w+")


def register(name: str):
    """`@register("name")`: a reward, fn(completion, answer, cfg) -> float in [0, 1]."""
    return REGISTRY.register(name)


def load_plugins() -> None:
    """Import the modules named in APPLIANCE_REWARD_PLUGINS (appliance.plugins: one line if one fails)."""
    REGISTRY.load()


def known() -> set[str]:
    load_plugins()
    return set(REGISTRY)


def _norm(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


@register("exact")
def exact(completion: str, answer: str, cfg) -> float:
    return float(bool(answer) and _norm(completion) == _norm(answer))


@register("overlap")
def overlap(completion: str, answer: str, cfg) -> float:
    got, want = _WORD.findall(completion.lower()), _WORD.findall(answer.lower())
    if not got or not want:
        return 0.0
    pool = list(want)
    common = 0
    for w in got:
        if w in pool:
            pool.remove(w)
            common += 1
    if not common:
        return 0.0
    p, r = common / len(got), common / len(want)
    return 2 * p * r / (p + r)


@register("regex")
def regex(completion: str, answer: str, cfg) -> float:
    return float(re.search(cfg.pattern, completion) is not None)


_NOT_JSON = object()


def _json(completion: str):
    """The answer as JSON (a fenced block is fine), or _NOT_JSON."""
    text = completion.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


@register("json_schema")
def json_schema(completion: str, answer: str, cfg) -> float:
    import jsonschema

    value = _json(completion)
    return float(value is not _NOT_JSON and jsonschema.Draft202012Validator(json.loads(cfg.schema)).is_valid(value))


@register("tool_call")
def tool_call(completion: str, answer: str, cfg) -> float:
    call = _json(completion)
    ok = (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
          and (not cfg.tools or call["name"] in cfg.tools))
    return float(ok)


def score(names: list[str], completion: str, answer: str, cfg, failures: dict) -> float:
    """The mean of the named rewards; a reward that fails scores 0 and is counted in `failures`."""
    total = 0.0
    for name in names:
        try:
            value = float(REGISTRY[name](completion, answer, cfg))
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"returned {value}, not a number in [0, 1]")
        except Exception as e:  # noqa: BLE001 - a site's reward must not end the run
            f = failures.setdefault(name, {"count": 0, "first": f"{type(e).__name__}: {e}"[:200]})
            f["count"] += 1
            value = 0.0
        total += value
    return total / len(names)
