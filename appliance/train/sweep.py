"""Hyperparameter sweeps: grid or random points over recipe keys; each trial a training run, judged by its
validation loss (with early stopping), ranked, and recorded in lineage as a `sweep` node.

A sweep file (TOML):

    # appliance jobs sweep lr.toml
    name = "lr-sweep"
    recipe = "tiny-dense"                     # a shipped recipe or a TOML file
    overrides = ["train.max_steps=200", "train.eval_every=20", "train.early_stop_patience=3"]
    method = "grid"                           # or "random"
    trials = 6                                # random: how many points; grid: at most this many
    seed = 0                                  # random: which points

    [space]
    "train.lr" = [1e-4, 3e-4, 1e-3]
    "train.warmup_steps" = [10, 50]

The points are drawn when the sweep is submitted, so the job is the same whenever it runs.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import tomllib
from pathlib import Path

from appliance.errors import UsageError
from appliance.train.config import build_recipe, load_recipe

METHODS = ("grid", "random")
MAX_POINTS = 10_000  # combinations in a space: a sweep is a queue of whole training runs


def points(space: dict[str, list], method: str, trials: int | None, seed: int) -> list[dict]:
    """The trial points: every combination in order (grid), or `trials` distinct ones drawn with `seed`."""
    keys = list(space)
    size = 1
    for k in keys:
        size *= len(space[k])
    if size > MAX_POINTS:
        raise UsageError(f"the space has {size:,} combinations", f"narrow it to {MAX_POINTS:,} or fewer")
    every = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]
    if method == "grid":
        return every[:trials] if trials else every
    return random.Random(seed).sample(every, min(trials or len(every), len(every)))


def trial_recipe(base: dict, point: dict, name: str):
    """The base recipe with the point's values and the trial's name."""
    sets = [f"{k}={json.dumps(v)}" for k, v in point.items()] + [f"name={json.dumps(name)}"]
    return build_recipe(copy.deepcopy(base), sets, f"trial {name}")


def load(path: str | Path) -> dict:
    """A sweep file made into a self-contained job spec; every problem is reported at once."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no sweep file {p}", "pass a TOML file (see `appliance jobs sweep --help`)")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"sweep {p.name} is not valid TOML: {e}", "fix the file") from None
    return from_dict(raw, f"sweep {p.name}")


def from_dict(raw: dict, label: str = "the sweep") -> dict:
    """The job spec of a sweep given as the file's keys (the API and MCP pass them directly)."""
    from appliance.vault.ingest import validate_name

    problems = []
    unknown = sorted(set(raw) - {"name", "recipe", "overrides", "method", "trials", "seed", "space"})
    if unknown:
        problems.append(f"unknown keys: {', '.join(unknown)}")
    name, method = raw.get("name"), raw.get("method", "grid")
    try:
        validate_name(str(name or ""), "sweep")
    except UsageError as e:
        problems.append(f"name: {e.message}")
    if method not in METHODS:
        problems.append(f"method must be grid or random, not {method!r}")
    trials, seed = raw.get("trials"), raw.get("seed", 0)
    if trials is not None and (not isinstance(trials, int) or trials < 1):
        problems.append("trials must be a positive integer")
    if method == "random" and trials is None:
        problems.append("a random sweep needs trials = N")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        problems.append("[space] must list at least one recipe key with a list of values")
        space = {}
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            problems.append(f"space.{key} must be a non-empty list of values")
    overrides = raw.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        problems.append("overrides must be a list of \"KEY=VALUE\" strings")
        overrides = []
    if problems:
        raise UsageError(f"{label} has {len(problems)} problem(s): " + "; ".join(problems), "fix the file")
    base = load_recipe(str(raw.get("recipe", "")), overrides)
    if not base.train.eval_every:
        raise UsageError(f"{label}: trials are ranked by validation loss, but train.eval_every is 0",
                         "add \"train.eval_every=N\" to overrides")
    chosen = points(space, method, trials, seed)
    for i, point in enumerate(chosen, 1):  # a bad value is refused now, not as trial 5 fails
        if not trial_recipe(base.to_dict(), point, f"{name}-t{i}").train.eval_every:
            raise UsageError(f"{label}: trial {i} ({point}) measures no validation loss (train.eval_every 0)",
                             "keep train.eval_every above 0 in every point")
    return {"name": name, "recipe": base.to_dict(), "space": space, "method": method, "seed": seed,
            "points": chosen}


def rank(results: list[dict]) -> list[dict]:
    """Trials that finished, lowest final validation loss first (the loss of the model each one saved);
    failed ones after, in trial order."""
    done = sorted((r for r in results if r.get("final_val_loss") is not None), key=lambda r: r["final_val_loss"])
    return done + [r for r in results if r.get("final_val_loss") is None]
