"""The stage spec: what the launcher tells every training process, typed and checked at both ends."""

import dataclasses
from pathlib import Path

import pytest

from appliance.train.config import load_recipe
from appliance.train.model import TrainError
from appliance.train.spec import StageSpec


def _spec(**kw) -> StageSpec:
    values = dict(run_id="tiny@1", recipe=load_recipe("sft-lora"), rows=12, val_rows=3,
                  tokenizer_path=Path("/h/artifacts/models/base@1"), base_path=Path("/h/artifacts/models/base@1"),
                  run_dir=Path("/h/artifacts/runs/tiny@1"), model_dir=Path("/h/artifacts/models/tiny@1"),
                  info={"id": "tiny@1", "task": {"sha256": "ab"}}, resume_from=None)
    return StageSpec(**{**values, **kw})


def test_a_spec_round_trips_through_json():
    spec = _spec(resume_from=Path("/h/artifacts/runs/tiny@1/checkpoints/step-00000004"))
    back = StageSpec.from_json(spec.to_json())
    assert back == spec
    assert back.stage == "sft" and isinstance(back.run_dir, Path) and back.recipe.train == spec.recipe.train
    pre = _spec(recipe=load_recipe("tiny-dense"), base_path=None)
    assert StageSpec.from_dict(pre.to_dict()) == pre and pre.to_dict()["base_path"] is None


def test_a_misspelt_or_missing_key_is_refused():
    raw = _spec().to_dict()
    raw["val_row"] = raw.pop("val_rows")
    with pytest.raises(TrainError, match="unknown key.*val_row.*missing key.*val_rows"):
        StageSpec.from_dict(raw)
    with pytest.raises(TypeError):
        StageSpec(**{**dataclasses.asdict(_spec()), "stage": "sft"})
    with pytest.raises(TrainError, match="rows must be"):
        _spec(rows="12")
    with pytest.raises(TrainError, match="needs a base_path"):
        _spec(base_path=None)
