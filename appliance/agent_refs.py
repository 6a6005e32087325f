"""What an agent may name: the allow-lists behind every agent call (api.agents), whatever skin serves it.

Agents name things, never paths. Before a call runs, what it names is resolved against what the vault or the
shipped folders hold, and anything else is refused (UsageError, one line): a recipe, suite or task is a
member of the shipped set (a suite may also be a dataset version DATASET@N in the vault); a model is a model
or GGUF id in the vault, never a directory; recipe overrides come from an allow-list of plain values
(AGENT_KEYS), each type-checked, with dataset, model and tokenizer references resolved in the vault and a
task by its shipped name; files to ingest lie inside the operator's inbox (APPLIANCE_MCP_INBOX).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from typing import Any

from appliance.errors import UsageError

AGENT_PII = ("redact", "pseudonymize")  # an agent never lands PII unscrubbed


def agent_pii(pii: str) -> str:
    """How an agent's ingest scrubs PII: redact or pseudonymize, never off or flag."""
    if pii not in AGENT_PII:
        raise UsageError(f"pii {pii!r} is not for agents", "use redact or pseudonymize")
    return pii


def inbox_paths(paths: list[str], home_root) -> list[str]:
    """Paths an agent may ingest: inside the operator's inbox (APPLIANCE_MCP_INBOX), links resolved."""
    from pathlib import Path

    inbox = os.environ.get("APPLIANCE_MCP_INBOX")
    if not inbox:
        raise UsageError("ingest over MCP needs an inbox", "the operator sets APPLIANCE_MCP_INBOX to the folder "
                                                           "agents may ingest from")
    root = Path(inbox).resolve()
    out = []
    for p in paths:
        real = Path(root, p).resolve()  # relative paths are inside the inbox
        if not real.is_relative_to(root) or real.is_relative_to(Path(home_root).resolve()):
            raise UsageError(f"{p} is outside the ingest inbox", f"put it under {root}")
        out.append(str(real))
    return out


def agent_recipe(recipe: str) -> str:
    """Agents train from the shipped recipes (and overrides); recipe files are the operator's. The recipe's
    file, by membership in the shipped set (never a name looked up on disk relative to somewhere)."""
    from appliance.train.config import shipped

    found = shipped()
    if not isinstance(recipe, str) or recipe not in found:
        raise UsageError(f"no shipped recipe named {recipe!r}", "use one of " + ", ".join(found))
    return str(found[recipe].resolve())


# --- what agents may name ----------------------------------------------------------------------------
def agent_suite(con, suite: str) -> str:
    """A shipped suite (or shipped task run as one) by name -> its file; or DATASET@N held by the vault."""
    from appliance.eval.suite import DATASET_REF, SUITES_DIR
    from appliance.tasks import TASKS_DIR
    from appliance.vault.versions import resolve

    if isinstance(suite, str) and DATASET_REF.match(suite):
        resolve(con, suite)  # a dataset version the vault holds, or VaultError
        return suite
    shipped = {p.stem: p for d in (TASKS_DIR, SUITES_DIR) for p in sorted(d.glob("*.toml"))}  # suites win
    if not isinstance(suite, str) or suite not in shipped:
        raise UsageError(f"no shipped suite named {suite!r}",
                         "use one of " + ", ".join(sorted(shipped)) + ", or DATASET@N (a dataset version in the vault)")
    return str(shipped[suite].resolve())


def agent_model(con, ref: str, kinds: tuple[str, ...] = ("model", "gguf")) -> str:
    """A model (or GGUF) id the vault holds; never a directory or a file."""
    from appliance.vault import lineage

    kind = lineage.kind_of(con, ref) if isinstance(ref, str) else None
    if kind not in kinds:
        raise UsageError(f"no {' or '.join(kinds)} {ref!r} in the vault",
                         "name a model by its id (`train_models`" + (", `quantize --list`" if "gguf" in kinds else "")
                         + "); agents never pass paths")
    return ref


def agent_task(name: str) -> str:
    """A shipped task by name -> its file."""
    from appliance.tasks import TASKS_DIR

    shipped = {p.stem: p for p in sorted(TASKS_DIR.glob("*.toml"))}
    if not isinstance(name, str) or name not in shipped:
        raise UsageError(f"no shipped task named {name!r}", "use one of " + ", ".join(sorted(shipped)))
    return str(shipped[name].resolve())


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _int(lo: int = 0, hi: int = 10**9):
    def check(con, key, v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise UsageError(f"{key} must be an integer from {lo} to {hi}, not {v!r}", "give a plain number")
        return v
    return check


def _float(lo: float = -1e9, hi: float = 1e9):
    def check(con, key, v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise UsageError(f"{key} must be a number from {lo:g} to {hi:g}, not {v!r}", "give a plain number")
        return float(v)
    return check


def _bool(con, key, v):
    if not isinstance(v, bool):
        raise UsageError(f"{key} must be true or false, not {v!r}", "give true or false")
    return v


def _choice(*options: str):
    def check(con, key, v):
        if v not in options:
            raise UsageError(f"{key} must be one of {', '.join(options)}, not {v!r}", "pick one of those")
        return v
    return check


def _text(con, key, v):
    if not isinstance(v, str) or len(v) > 4000 or "\0" in v:
        raise UsageError(f"{key} must be a string of at most 4000 characters", "give plain text")
    return v


def _name(con, key, v):
    from appliance.vault.ingest import NAME_RE

    if not isinstance(v, str) or not NAME_RE.match(v):
        raise UsageError(f"{key} {v!r} must be lowercase letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit", "give a plain name")
    return v


def _list(item):
    def check(con, key, v):
        if isinstance(v, str):  # one name or a comma list, as on the command line
            v = [x.strip() for x in v.split(",") if x.strip()]
        if not isinstance(v, list) or not v or len(v) > 64:
            raise UsageError(f"{key} must be a list of 1 to 64 names", "give names, comma-separated")
        return [item(con, key, x) for x in v]
    return check


def _ident(con, key, v):
    if not isinstance(v, str) or not _IDENT.match(v):
        raise UsageError(f"{key}: {v!r} is not a plain identifier", "letters, digits and '_'")
    return v


def _dataset(con, key, v):
    from appliance.vault.versions import resolve

    if not isinstance(v, str):
        raise UsageError(f"{key}: {v!r} is not a dataset version", "name one as NAME@N")
    _, name, n = resolve(con, v)  # VaultError unless the vault holds it
    return f"{name}@{n}"


def _node(kind: str, what: str):
    def check(con, key, v):
        from appliance.train.run import resolve_node

        if not isinstance(v, str) or not v:
            raise UsageError(f"{key} must name a {what} in the vault", "by its id, e.g. NAME@K")
        return resolve_node(con, v, (kind,), what)  # the id it stands for now, or UsageError
    return check


def _task(con, key, v):
    return agent_task(v)


def _reward(con, key, v):
    from appliance.train.rewards import known

    if v not in known():
        raise UsageError(f"{key}: unknown reward {v!r}", "built in: " + ", ".join(sorted(known())))
    return v


_SHAPE = _int(1, 1 << 20)
# The recipe keys an agent may set (jobs_submit overrides, jobs_sweep overrides and space), each with its check.
# Plain values only: nothing here is a path or names a file; references resolve in the vault or the shipped set.
AGENT_KEYS: dict[str, Any] = {
    "name": _name, "method": _choice("full", "lora", "qlora"),
    "model.base": _node("model", "base model"), "model.arch": _choice("dense", "moe"),
    **{f"model.{k}": _SHAPE for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                                      "max_seq_len", "num_experts", "experts_per_token")},
    "model.rope_theta": _float(0, 1e9), "model.tie_embeddings": _bool, "model.router_aux_loss": _float(0, 100),
    "data.datasets": _list(_dataset), "data.tokenizer": _node("tokenizer", "tokenizer"), "data.task": _task,
    "data.seq_len": _SHAPE, "data.format": _choice("text", "chat", "preference", "prompts", "task"),
    **{f"data.{k}": _ident for k in ("prompt_field", "response_field", "chosen_field", "rejected_field")},
    "data.system_prompt": _text,
    **{f"train.{k}": _int() for k in ("max_steps", "batch_size", "micro_batch_size", "warmup_steps", "seed",
                                      "checkpoint_every", "keep_checkpoints", "eval_every", "early_stop_patience")},
    **{f"train.{k}": _float() for k in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "dpo_beta")},
    "train.activation_checkpointing": _bool, "train.precision": _choice("auto", "bf16", "fp32"),
    "train.parallel": _choice("auto", "ddp", "fsdp"), "train.gpu_memory_gb": _float(1, 1 << 20),
    "data.cross_document": _bool,
    "lora.rank": _int(1, 4096), "lora.alpha": _float(), "lora.dropout": _float(0, 1), "lora.merge": _bool,
    "lora.target_modules": _list(_ident),
    "grpo.rewards": _list(_reward), "grpo.group_size": _int(1, 1024), "grpo.max_new_tokens": _int(1, 1 << 16),
    "grpo.temperature": _float(), "grpo.kl_beta": _float(), "grpo.pattern": _text, "grpo.schema": _text,
    "grpo.tools": _list(_ident),
}
_TEXT_KEYS = {k for k, c in AGENT_KEYS.items() if c in (_name, _text, _task, _ident) or k in (
    "method", "model.base", "model.arch", "data.tokenizer", "data.format", "train.precision", "train.parallel")}


def agent_value(con, key: str, value):
    """`value` for recipe key `key` if an agent may set it (checked, references resolved), else UsageError."""
    if key not in AGENT_KEYS:
        raise UsageError(f"recipe key {key!r} is not for agents",
                         "agents set plain values only: " + ", ".join(sorted(AGENT_KEYS)))
    return AGENT_KEYS[key](con, key, value)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def agent_overrides(con, overrides: list[str]) -> list[str]:
    """KEY=VALUE overrides from an agent, each checked against AGENT_KEYS; rewritten with what they resolved
    to (so the job runs exactly what was checked)."""
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UsageError("overrides must be a list of \"KEY=VALUE\" strings", "e.g. [\"train.max_steps=100\"]")
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UsageError(f"override {item!r} must be KEY=VALUE", "e.g. train.lr=1e-4")
        try:  # as the recipe reads it: a TOML literal, else a bare string
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if key in _TEXT_KEYS and not isinstance(value, str):
            value = text.strip()
        out.append(f"{key}={_toml(agent_value(con, key, value))}")
    return out


def agent_name(key: str, value) -> str:
    """A plain name an agent gives (a run, a sweep): it becomes directory names and ids."""
    return _name(None, key, value)


def agent_space(con, space: dict) -> dict:
    """A sweep's space from an agent: each key from AGENT_KEYS, each value checked as an override would be."""
    if not isinstance(space, dict):
        raise UsageError("space must map recipe keys to lists of values", "e.g. {\"train.lr\": [1e-4, 1e-3]}")
    out = {}
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"space.{key} must be a non-empty list of values", "e.g. [1e-4, 1e-3]")
        out[key] = [agent_value(con, key, v) for v in values]
    return out
