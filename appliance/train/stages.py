"""The training stages. Each reads top to bottom: load inputs, build the model, fit, save.

They share only real mechanisms: the data path (`data`), the loop (`loop.fit`), checkpoints and saving.
Every process of a run calls the same stage function with the same `StageSpec` (`spec.py`); the launcher
(`run.py`) does the vault side: packing rows, recording metrics, lineage and audit.
"""

from __future__ import annotations

from appliance.train import loop, precision
from appliance.train.config import Recipe
from appliance.train.data import position_rule
from appliance.train.model import (
    TrainError,
    hf_config,
    load_base,
    load_reference,
    load_tokenizer,
    new_model,
    save_model,
)
from appliance.train.spec import StageSpec


def pretrain(spec: StageSpec, link, dist: loop.Dist) -> dict:
    """From random weights: a preset shape, the run's own tokenizer."""
    recipe = spec.recipe
    tokenizer = load_tokenizer(spec.tokenizer_path)
    config = hf_config(recipe.model, tokenizer)
    fsdp, plan = _layout(recipe, dist, config)
    if fsdp:
        model = loop.build_sharded(config, lambda: new_model(recipe.model, tokenizer, recipe.train.seed), dist, plan)
    else:
        model = new_model(recipe.model, tokenizer, recipe.train.seed, plan.attention).to(dist.device)
    coef = recipe.model.router_aux_loss if recipe.model.arch == "moe" else 0.0
    res = _fit(model, link, recipe, spec, dist, coef, tokenizer=tokenizer)
    return _save(res, tokenizer, spec, dist, adapter=False)


def continue_(spec: StageSpec, link, dist: loop.Dist) -> dict:
    """More next-token training of a base model on new data, with the base's tokenizer."""
    recipe = spec.recipe
    tokenizer = load_tokenizer(spec.base_path)
    base = spec.base_path
    config = _base_config(base)
    fsdp, plan = _layout(recipe, dist, config)
    if fsdp:
        model = loop.build_sharded(config, lambda: load_base(base), dist, plan)
    else:
        model = load_base(base, attention=plan.attention).to(dist.device)
    res = _fit(model, link, recipe, spec, dist, _aux_coef(model), tokenizer=tokenizer)
    return _save(res, tokenizer, spec, dist, adapter=False)


def sft(spec: StageSpec, link, dist: loop.Dist) -> dict:
    """Chat fine-tuning: every weight (full), or LoRA adapters on a frozen (qlora: 4-bit) base."""
    import torch

    recipe = spec.recipe
    torch.manual_seed(recipe.train.seed)  # adapter init
    tokenizer = load_tokenizer(spec.base_path, chat=True)
    base = spec.base_path
    config = _base_config(base)
    fsdp, plan = _layout(recipe, dist, config)
    if fsdp:
        model = loop.build_sharded(config, lambda: load_base(base), dist, plan)
    else:
        model = load_base(base, recipe.method, recipe.lora, dist.device, plan.frozen, plan.attention)
        if recipe.method != "qlora":  # a 4-bit model is placed on its device when loaded
            model = model.to(dist.device)
    res = _fit(model, link, recipe, spec, dist, _aux_coef(model), tokenizer=tokenizer)
    return _save(res, tokenizer, spec, dist, adapter=recipe.method != "full")


def dpo(spec: StageSpec, link, dist: loop.Dist) -> dict:
    """Preference tuning on [chosen | rejected] rows, anchored to the base (see `preference`)."""
    from appliance.train.preference import DPO

    recipe, tokenizer, model, reference = _policy_and_reference(spec, dist)
    res = _fit(model, link, recipe, spec, dist, 0.0, DPO(recipe.train.dpo_beta, reference))
    return _save(res, tokenizer, spec, dist, adapter=recipe.method != "full")


def grpo(spec: StageSpec, link, dist: loop.Dist) -> dict:
    """Reinforcement tuning with reward functions on sampled answers (see `grpo`)."""
    from appliance.train.grpo import GRPO, Generator
    from appliance.train.rewards import load_plugins

    load_plugins()
    recipe, tokenizer, model, reference = _policy_and_reference(spec, dist)
    task = None
    if recipe.data.format == "task":
        from appliance.tasks import load

        task = load(recipe.data.task)
        recorded = spec.info.get("task", {}).get("sha256")  # what the launcher recorded in the run's lineage
        if recorded and task.sha256 != recorded:
            raise TrainError(f"task {task.path} or its tools changed after the run started",
                             "leave the task's files alone while it trains, then run it again")
    plan = precision.plan(dist.device, recipe.train.precision)
    sampler = Generator(plan.frozen, static=dist.device.startswith("cuda"))  # bf16, static cache on a GPU
    objective = GRPO(recipe.grpo, tokenizer, reference, recipe.train.seed, dist.rank, task, recipe.data.system_prompt,
                     sampler)
    res = _fit(model, link, recipe, spec, dist, 0.0, objective)
    return {**_save(res, tokenizer, spec, dist, adapter=recipe.method != "full"), "rewards": objective.summary()}


def _policy_and_reference(spec: StageSpec, dist: loop.Dist):
    """(recipe, tokenizer, policy, reference) for a stage tuned against its base: the policy with LoRA/QLoRA
    adapters or every weight trainable, dropout off; the reference None for adapters (the policy with its
    adapters off), else a frozen copy of the base."""
    import torch

    recipe = spec.recipe
    torch.manual_seed(recipe.train.seed)  # adapter init
    base = spec.base_path
    tokenizer = load_tokenizer(base, chat=True)
    config = _base_config(base)
    fsdp, plan = _layout(recipe, dist, config)
    if fsdp:
        model = loop.build_sharded(config, lambda: load_base(base), dist, plan)
    else:
        model = load_base(base, recipe.method, recipe.lora, dist.device, plan.frozen, plan.attention)
        if recipe.method != "qlora":  # a 4-bit model is placed on its device when loaded
            model = model.to(dist.device)
    _no_dropout(model)  # policy and reference must score the same text the same way
    reference = None
    if recipe.method == "full":  # frozen: bf16 on a GPU (`precision.plan`), kept whole on each process
        reference = load_reference(base, dist.device, plan.frozen, plan.attention)
    return recipe, tokenizer, model, reference


STAGES = {"pretrain": pretrain, "continue": continue_, "sft": sft, "dpo": dpo, "grpo": grpo}


def _no_dropout(model) -> None:
    """Dropout off: the loop trains in train mode, and a preference or policy-gradient loss compares the
    policy with the reference on the same text, which random masks would make noise of (and the
    loss at step 1 would no longer be the reference's)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(loop.unwrap(model), "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if cfg is not None and getattr(cfg, key, None):
            setattr(cfg, key, 0.0)


def _layout(recipe: Recipe, dist: loop.Dist, config) -> tuple[bool, precision.PrecisionPlan]:
    """(FSDP2 or not, the dtypes): the recipe's train.parallel, or with "auto" the mode whose memory estimate
    fits one GPU (`memory.choose`: DDP when it fits, else FSDP2); FSDP2 only for full training on several
    processes. The dtypes follow (`precision.plan`): bf16 compute on a GPU, fp32 masters, bf16 frozen weights."""
    fsdp = False
    if dist.world > 1 and recipe.method == "full":
        if recipe.train.parallel == "auto":
            from appliance.train import memory

            shape = memory.shape_of(memory.meta_model(config), recipe.lora.rank, recipe.lora.target_modules)
            fsdp = memory.choose(shape, recipe, dist.shard_size)[0] == "fsdp"  # HSDP shards within a node
        else:
            fsdp = recipe.train.parallel == "fsdp"
    return fsdp, precision.plan(dist.device, recipe.train.precision, fsdp=fsdp)


def _base_config(base):
    from transformers import AutoConfig

    from appliance import sealed

    with sealed.opened(base, weights=False) as d:
        return AutoConfig.from_pretrained(str(d), local_files_only=True)


def _aux_coef(model) -> float:
    cfg = model.config
    return float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0) if getattr(cfg, "num_local_experts", 0) else 0.0


def _fit(model, link, recipe: Recipe, spec: StageSpec, dist: loop.Dist, aux: float, objective=None,
         tokenizer=None) -> loop.FitResult:
    eos = getattr(tokenizer, "eos_token_id", None)
    return loop.fit(model, link.rows, spec.rows, recipe.train, dist, spec.run_dir / "checkpoints",
                    link.step, link.checkpoint, resume_from=spec.resume_from, aux_loss_coef=aux,
                    state={"run": spec.run_id}, n_val=spec.val_rows, objective=objective,
                    positions=position_rule(recipe.data, eos))


def _save(res: loop.FitResult, tokenizer, spec: StageSpec, dist: loop.Dist, adapter: bool) -> dict:
    """The final model (or adapter) directory, when the run finished; rank 0 writes it."""
    out = {"status": res.status, "step": res.step, "loss": res.loss, "tokens": res.tokens,
           "seconds": res.seconds, "checkpoint": res.checkpoint, "model_path": None}
    if res.status != "done":
        return out
    model = res.model
    state = None
    if dist.world > 1 and not hasattr(model, "module"):  # FSDP2: gather the shards (every rank takes part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(loop.unwrap(model).config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the embedding, saved once as in a single-process run
    if dist.is_main:
        base = loop.unwrap(model)
        if hasattr(base, "generation_config") and getattr(tokenizer, "chat_template", None):
            _stop_on_turn_end(base, tokenizer)
        save_model(base, tokenizer, spec.model_dir, spec.info, state_dict=state)
        out["model_path"] = str(spec.model_dir)
    if dist.world > 1:  # the other ranks wait for the model on disk before they take their process group down
        import torch.distributed

        torch.distributed.barrier()
    out["adapter"] = adapter
    return out


def _stop_on_turn_end(model, tokenizer) -> None:
    """Chat models stop generating at the end of their turn as well as at EOS."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id and end is not None:
        eos = model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if end not in ids:
            model.generation_config.eos_token_id = [*ids, end]
