"""What a training stage is told: one typed value the launcher builds and every process of the run reads.

The launcher (`run.py`) makes a `StageSpec` once per run. A single-process run hands it to the stage
function directly; a multi-process run sends `to_dict()` to each torchrun rank over the private socket
(`launch.py`), where `from_dict` rebuilds it. It is never written to disk: a resumed run builds a new one
(the checkpoint holds only its step, loss and run id, the run directory the lineage `info`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from appliance.train.config import Recipe, from_dict
from appliance.train.model import TrainError


@dataclass(frozen=True)
class StageSpec:
    """One run of one stage, as every rank sees it."""

    run_id: str
    """The run's id, NAME@K: its lineage node, and the `run` recorded in each checkpoint."""
    recipe: Recipe
    """The resolved recipe (stage, method, model, data, train, lora, grpo)."""
    rows: int
    """Training rows: indices 0 .. rows-1 of what the launcher serves."""
    val_rows: int
    """Validation rows, served after the training rows (0: no validation)."""
    tokenizer_path: Path
    """The tokenizer's directory (pretrain: the run's own; otherwise the base model's)."""
    base_path: Path | None
    """The base model's directory; None for pretrain, which starts from random weights."""
    run_dir: Path
    """Where the run's checkpoints go (`run_dir/checkpoints`)."""
    model_dir: Path
    """Where the finished model (or adapter) is saved."""
    info: dict
    """The run's lineage record, saved beside the model (`save_model`); JSON-safe."""
    resume_from: Path | None
    """The checkpoint to resume from, or None for a fresh run."""

    def __post_init__(self):
        problems = []
        if not isinstance(self.recipe, Recipe):
            problems.append(f"recipe must be a Recipe, not {type(self.recipe).__name__}")
        for name in ("rows", "val_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a whole number >= 0, not {value!r}")
        for name in ("tokenizer_path", "run_dir", "model_dir"):
            if not isinstance(getattr(self, name), Path):
                problems.append(f"{name} must be a Path")
        for name in ("base_path", "resume_from"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Path):
                problems.append(f"{name} must be a Path or None")
        if isinstance(self.recipe, Recipe) and self.recipe.stage != "pretrain" and self.base_path is None:
            problems.append(f"stage {self.recipe.stage!r} needs a base_path")
        if not isinstance(self.info, dict):
            problems.append("info must be a dict")
        if problems:
            raise TrainError(f"bad stage spec: {'; '.join(problems)}", "this is a bug in the launcher")

    @property
    def stage(self) -> str:
        """The stage function to run (a key of `stages.STAGES`)."""
        return self.recipe.stage

    def to_dict(self) -> dict:
        """A JSON-safe dict: paths as strings, the recipe as `Recipe.to_dict()`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Recipe):
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> StageSpec:
        """The spec `to_dict` made; an unknown or missing key is refused, naming it."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(names))
        missing = [n for n in names if n not in raw]
        if unknown or missing:
            said = [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
            said += [f"missing key(s) {', '.join(missing)}"] if missing else []
            raise TrainError(f"bad stage spec: {'; '.join(said)}",
                             "the launcher and the training processes must run the same appliance version")
        problems: list[str] = []
        recipe = from_dict(raw["recipe"], problems) if isinstance(raw["recipe"], dict) else raw["recipe"]
        if problems:
            raise TrainError(f"bad stage spec: recipe: {'; '.join(problems)}", "this is a bug in the launcher")

        def path(key: str) -> Path | None:
            return None if raw[key] is None else Path(raw[key])

        return cls(run_id=raw["run_id"], recipe=recipe, rows=raw["rows"], val_rows=raw["val_rows"],
                   tokenizer_path=path("tokenizer_path"), base_path=path("base_path"), run_dir=path("run_dir"),
                   model_dir=path("model_dir"), info=raw["info"], resume_from=path("resume_from"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> StageSpec:
        return cls.from_dict(json.loads(text))
