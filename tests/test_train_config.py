"""Recipes, overrides and validation; the schedule and data order the loop relies on."""

import math

import numpy as np
import pytest

from appliance.errors import UsageError
from appliance.train.config import TrainConfig, load_recipe, shipped
from appliance.train.loop import Order, lr_at
from appliance.train.model import count_parameters

REAL = {"dense-1b": (1.0e9, 1.3e9), "dense-7b": (6.3e9, 7.0e9), "moe-8x1b": (3.0e9, 4.0e9),
        "moe-8x7b": (45e9, 48e9)}


def test_every_shipped_recipe_loads_and_says_how_to_run_it():
    names = set(shipped())
    assert {"tiny-dense", "tiny-moe", "dense-1b", "dense-7b", "moe-8x1b", "moe-8x7b", "continue", "sft-full",
            "sft-lora", "sft-qlora"} <= names
    for name, path in shipped().items():
        r = load_recipe(name)
        assert r.name and r.stage in ("pretrain", "continue", "sft", "dpo", "grpo")
        assert path.read_text().splitlines()[0].startswith(f"# appliance train run {name}")


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_presets_are_k_quant_friendly_and_the_size_they_claim(name):
    m = load_recipe(name).model
    assert m.hidden_size % 256 == 0 and m.intermediate_size % 256 == 0
    p = count_parameters(m, vocab_size=32000)  # built on the meta device: no memory
    lo, hi = REAL[name]
    assert lo <= p["total"] <= hi
    if m.arch == "moe":
        assert p["active"] < p["total"] / 2


def test_overrides_are_typed_and_every_problem_is_listed_at_once():
    r = load_recipe("tiny-dense", ["train.lr=1e-4", "train.min_lr=1e-5", "train.max_steps=7", "data.datasets=a@1,b@2",
                                   "train.activation_checkpointing=true", "name=other"])
    assert r.train.lr == 1e-4 and r.train.max_steps == 7 and r.data.datasets == ["a@1", "b@2"]
    assert r.train.activation_checkpointing is True and r.name == "other"
    with pytest.raises(UsageError) as e:
        load_recipe("tiny-dense", ["train.lr=-1", "model.hiden_size=3", "model.num_heads=5", "data.seq_len=abc",
                                   "method=lora", "bogus.key=1"])
    msg = e.value.message
    for part in ("train.lr must be positive", "unknown key model.hiden_size (did you mean model.hidden_size?)",
                 "model.hidden_size (64) must be a multiple of model.num_heads (5)",
                 "data.seq_len must be an integer, not 'abc'", "method 'lora' is for stages sft, dpo and grpo",
                 "override key 'bogus.key'"):
        assert part in msg, part
    assert msg.startswith("recipe tiny-dense.toml has 8 problems")


def test_stage_specific_requirements(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('stage = "sft"\nname = "x"\n[data]\ndatasets = ["qa"]\nformat = "text"\n'
                   'tokenizer = "t"\n[train]\nwarmup_steps = 500\nmax_steps = 10\n')
    with pytest.raises(UsageError) as e:
        load_recipe(str(bad))
    msg = e.value.message
    assert "model.base is required for stage 'sft'" in msg and "data.format must be 'chat'" in msg
    assert "data.tokenizer is not used by stage 'sft'" in msg and "train.warmup_steps" in msg
    bad.write_text("stage = [")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_recipe(str(bad))
    with pytest.raises(UsageError, match="no recipe named 'nope'"):
        load_recipe("nope")


def test_cli_overrides_both_spellings(train_home, cli):
    r = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--train.max_steps", "0",
            "--set", "train.lr=0", "--model.num_layers=0")
    assert r.code == 2
    err = r.json["error"]
    assert "train.max_steps must be at least 1" in err and "train.lr must be positive" in err
    assert "model.num_layers must be at least 1" in err
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--train.lr")
    assert r.code == 2 and "--train.lr needs a value" in r.err


def test_learning_rate_schedule():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_data_order_is_a_seeded_permutation_per_epoch():
    a, b = Order(10, seed=1), Order(10, seed=1)
    first = np.concatenate([a.batch(s, 5) for s in range(2)])
    assert sorted(first) == list(range(10))  # one epoch: every row once
    assert np.array_equal(first, np.concatenate([b.batch(s, 5) for s in range(2)]))
    assert not np.array_equal(first, np.concatenate([Order(10, seed=2).batch(s, 5) for s in range(2)]))
    assert sorted(np.concatenate([a.batch(s, 5) for s in (2, 3)])) == list(range(10))  # next epoch, reshuffled
    assert np.array_equal(a.batch(3, 4), Order(10, seed=1).batch(3, 4))  # any step, no history needed


def test_recipes_command_lists_presets_and_keys(cli):
    r = cli("--json", "train", "recipes")
    assert r.code == 0, r.err
    by = {i["name"]: i for i in r.json["recipes"]}
    assert by["dense-1b"]["parameters"]["total"] == pytest.approx(1.1e9, rel=0.05)
    assert by["moe-8x7b"]["arch"] == "moe" and by["sft-qlora"]["method"] == "qlora"
    assert by["tiny-dense"]["command"] == "appliance train run tiny-dense"
    keys = {k["key"]: k for k in cli("--json", "train", "recipes", "--keys").json["keys"]}
    assert keys["train.lr"]["default"] == 3e-4 and "learning rate" in keys["train.lr"]["help"].lower()
    assert {"stage", "method", "model.base", "data.seq_len", "lora.rank"} <= set(keys)


def test_a_run_recorded_before_a_section_existed_still_resumes():
    """Recipes recorded by an older version lack sections added since ([grpo]); their defaults are what that
    version did, so a resume sees no change."""
    from appliance.train.config import load_recipe
    from appliance.train.run import _complete, _diff

    recipe = load_recipe("tiny-dense")
    old = recipe.to_dict()
    del old["grpo"], old["train"]["dpo_beta"]
    assert _diff(old, recipe.to_dict()) == {"grpo", "train.dpo_beta"}
    assert _diff(_complete(old), recipe.to_dict()) == set()
