"""Every shipped recipe fits the box (8 x 141 GB) in the parallel mode chosen for it, by a memory estimate of
the model built on the meta device."""

import pytest

from appliance.train import memory
from appliance.train.config import load_recipe, shipped
from appliance.train.model import hf_config

BOX = 8
BASE = "dense-7b"  # the base the fine-tuning recipes are sized for: the largest dense preset


class _Vocab:
    """A tokenizer as `hf_config` reads it: a 32,000-token vocabulary."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 32000


def _shape(recipe):
    model_cfg = recipe.model if recipe.stage == "pretrain" else load_recipe(BASE).model
    model = memory.meta_model(hf_config(model_cfg, _Vocab()))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    return memory.shape_of(model, recipe.lora.rank, recipe.lora.target_modules)


@pytest.fixture(scope="module")
def plans():
    out = {}
    for name in sorted(shipped()):
        recipe = load_recipe(name)
        mode, est = memory.choose(_shape(recipe), recipe, BOX)
        out[name] = (recipe, mode, est)
    return out


def test_every_shipped_recipe_fits_in_its_chosen_mode(plans):
    too_big = {name: est.gb() for name, (_, _, est) in plans.items() if not est.fits}
    assert not too_big


def test_auto_picks_ddp_where_it_fits_and_fsdp_where_it_does_not(plans):
    modes = {name: mode for name, (_, mode, _) in plans.items()}
    for name in ("tiny-dense", "tiny-moe", "dense-1b", "moe-8x1b", "sft-lora", "sft-qlora", "dpo-lora", "grpo-lora"):
        assert modes[name] == "ddp", name
    for name in ("dense-7b", "moe-8x7b", "sft-full", "continue"):
        assert modes[name] == "fsdp", name
    # full training of a 7B base does not fit under DDP: about 22 bytes a parameter before activations
    recipe = plans["sft-full"][0]
    assert not memory.estimate(_shape(recipe), recipe, "ddp", BOX).fits


def test_the_count_matches_the_model_and_the_box_is_a_setting(plans):
    from appliance.train.model import count_parameters

    recipe = plans["dense-1b"][0]
    shape = _shape(recipe)
    assert shape.params == count_parameters(recipe.model)["total"]
    recipe.train.gpu_memory_gb = 24.0  # a smaller GPU: dense-1b no longer fits replicated
    assert memory.choose(shape, recipe, BOX)[0] == "fsdp"


def test_fsdp_is_allowed_for_full_preference_and_reinforcement_tuning():
    from appliance.errors import UsageError

    for name in ("dpo-lora", "grpo-lora"):
        recipe = load_recipe(name, ["method=full", "train.parallel=fsdp"])
        assert recipe.train.parallel == "fsdp"
    with pytest.raises(UsageError, match="not available for data.format 'task'"):
        load_recipe("grpo-task", ["method=full", "train.parallel=fsdp"])
    assert load_recipe("tiny-dense").train.parallel == "auto"


def test_each_recipe_recomputes_activations_only_as_much_as_it_needs_to_fit(plans):
    from appliance.train.config import checkpointing_mode

    recipes = {name: load_recipe(name) for name in plans}  # fresh: other tests change the fixture's
    used = {name: checkpointing_mode(recipe.train.activation_checkpointing) for name, recipe in recipes.items()}
    least = {name: memory.least_checkpointing(_shape(recipe), recipe, plans[name][1], BOX)
             for name, recipe in recipes.items()}
    assert used == least
    assert used["dense-1b"] == "none" and used["moe-8x7b"] == "full"
    recipe = recipes["moe-8x7b"]  # selective sits between none and full
    sizes = {}
    for ac in ("none", "selective", "full"):
        recipe.train.activation_checkpointing = ac
        sizes[ac] = memory.estimate(_shape(recipe), recipe, "fsdp", BOX).activations
    assert sizes["none"] > sizes["selective"] > sizes["full"]


def test_the_loss_never_holds_the_whole_logits_of_a_pretraining_micro_batch(plans):
    recipe, mode, est = plans["dense-1b"]  # 8 x 2048 tokens, 32k vocabulary: whole fp32 logits would be ~7 GB
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    assert est.logits < 0.3 * 14 * tokens * 32000
