"""Dtype audit: what a GPU run builds (checked on CPU through `precision.plan`), experts and frozen weights."""

import pytest

from appliance.train import loop, precision, stages
from appliance.train.config import LoraConfig, Recipe
from appliance.train.model import load_base, load_reference


def test_fsdp_on_gpu_gets_bf16_params_fp32_reduction_and_no_autocast():
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    p = precision.plan("cuda:0", "auto", fsdp=True, flash=False)
    policy = precision.mp_policy(p)
    assert isinstance(policy, MixedPrecisionPolicy)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert not p.autocast and p.master == "float32" and p.frozen == "bfloat16" and p.attention == "sdpa"
    assert precision.plan("cuda:0", "auto", fsdp=True, flash=True).attention == "flash_attention_2"


def test_ddp_on_gpu_autocasts_and_cpu_stays_fp32():
    gpu = precision.plan("cuda:3", "auto", fsdp=False, flash=False)
    assert gpu.autocast and gpu.compute == gpu.experts == gpu.frozen == "bfloat16" and gpu.master == "float32"
    assert precision.mp_policy(gpu) is None
    cpu = precision.plan("cpu", "auto", fsdp=True)
    assert not cpu.autocast and precision.mp_policy(cpu) is None
    assert cpu.compute == cpu.frozen == cpu.experts == cpu.master == "float32" and cpu.attention == "sdpa"
    assert precision.plan("cuda", "fp32", fsdp=True).fsdp_param is None


def test_stages_build_the_gpu_plan_for_the_recipe():
    recipe = Recipe(stage="sft", name="x", method="lora")
    fsdp, plan = stages._layout(recipe, loop.Dist(device="cuda:0"), None)
    assert not fsdp and plan.frozen == "bfloat16" and plan.autocast
    recipe.train.parallel = "fsdp"
    recipe.method = "full"
    fsdp, plan = stages._layout(recipe, loop.Dist(world=8, device="cuda:0"), None)
    assert fsdp and plan.fsdp_param == "bfloat16" and plan.fsdp_reduce == "float32" and not plan.autocast


def _tiny_moe():
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _expert_kernel_dtypes(model, plan):
    """(input, weight) dtypes of every matmul the experts run, as the kernels receive them."""
    import torch
    from torch.overrides import TorchFunctionMode

    seen = set()
    matmuls = {torch.nn.functional.linear, torch.matmul, torch.bmm}
    matmuls |= {f for f in (getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None)) if f}

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                seen.add((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    mode = Log()
    for m in model.modules():
        if type(m).__name__.endswith("Experts"):
            m.register_forward_pre_hook(lambda *a: [mode.__enter__()] and None)
            m.register_forward_hook(lambda *a: mode.__exit__(None, None, None) and None)
    x = torch.randint(0, 64, (2, 8))
    with precision.autocast(plan):
        out = model(input_ids=x, use_cache=False).logits
    out.float().sum().backward()
    return seen


def test_moe_experts_compute_in_bf16_with_fp32_masters_under_autocast():
    import torch

    plan = precision.plan("cpu", "bf16", fsdp=False)  # what a GPU without FSDP runs, on the CPU
    model = _tiny_moe()
    assert precision.bf16_experts(model, plan) == 1
    seen = _expert_kernel_dtypes(model, plan)
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    for w in experts.parameters():
        assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32
        assert float(w.grad.abs().sum()) > 0
    assert precision.bf16_experts(_tiny_moe(), precision.plan("cpu", "auto")) == 0  # fp32 on CPU: unchanged


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    return path


def test_frozen_weights_load_in_the_plans_dtype(base_dir):
    import torch

    gpu = precision.plan("cuda:0", "auto", flash=False)
    model = load_base(base_dir, "lora", LoraConfig(target_modules=["q_proj", "v_proj"]), "cpu", gpu.frozen)
    for name, w in model.named_parameters():
        assert w.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
        assert w.requires_grad == ("lora_" in name)
    ref = load_reference(base_dir, "cpu", gpu.frozen)
    assert {w.dtype for w in ref.parameters()} == {torch.bfloat16}
    assert not any(w.requires_grad for w in ref.parameters())
    full = load_base(base_dir, "full", frozen_dtype=gpu.frozen)  # trained weights stay fp32 masters
    assert {w.dtype for w in full.parameters()} == {torch.float32}
    cpu = precision.plan("cpu")
    assert {w.dtype for w in load_reference(base_dir, "cpu", cpu.frozen).parameters()} == {torch.float32}
