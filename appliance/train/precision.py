"""Which dtype each kind of weight and each computation gets, decided once per run from the device.

On a GPU (bf16 by default, `train.precision`):
- trainable weights and AdamW state stay fp32 (the master copy the optimizer updates);
- under FSDP2 there is no autocast: `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` gathers each
  layer's weights as bf16 for its forward and backward, and reduce-scatters gradients in fp32;
- without FSDP (one process, DDP) bf16 autocast runs the matmuls; mixture-of-experts weights, whose kernels
  (grouped matmuls) autocast does not cover, are cast to bf16 for the experts' forward (`bf16_experts`);
- frozen weights (a LoRA base, the DPO/GRPO reference model) are loaded in bf16: nothing updates them,
  so an fp32 copy would only be re-cast on every forward.
On a CPU everything is fp32 unless `train.precision = "bf16"` asks for autocast.

`plan(device, precision, fsdp)` is pure (no torch), so a CPU test checks what a GPU run would build.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16, FP32 = "bfloat16", "float32"


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtypes of one run (names of torch dtypes)."""

    device: str
    """cpu or cuda[:N]."""
    master: str
    """Trainable weights, their gradients and the optimizer state."""
    compute: str
    """Matmuls of the forward and backward."""
    autocast: bool
    """bf16 autocast around the forward (False under FSDP2's policy, and in fp32)."""
    fsdp_param: str | None
    """FSDP2 MixedPrecisionPolicy param_dtype (None: no policy)."""
    fsdp_reduce: str | None
    """FSDP2 MixedPrecisionPolicy reduce_dtype: gradients are reduced in fp32."""
    frozen: str
    """Weights nothing trains: a LoRA/QLoRA base's, the reference model of DPO/GRPO."""
    experts: str
    """Mixture-of-experts expert weights as the experts' kernels see them."""
    attention: str
    """transformers attention implementation: flash_attention_2 (varlen on packed rows) when installed on a
    GPU, else sdpa (a block-causal mask on packed rows)."""


def plan(device: str, precision: str = "auto", fsdp: bool = False, flash: bool | None = None) -> PrecisionPlan:
    """The dtypes for a run on `device` ("cpu", "cuda", "cuda:3") with `train.precision` and FSDP2 or not.

    `flash`: whether flash-attention is installed (None: look for it).
    """
    cuda = device.startswith("cuda")
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    compute = BF16 if bf16 else FP32
    if flash is None:
        flash = cuda and _has_flash_attention()
    return PrecisionPlan(
        device=device, master=FP32, compute=compute,
        autocast=bf16 and not fsdp,
        fsdp_param=BF16 if bf16 and fsdp else None, fsdp_reduce=FP32 if bf16 and fsdp else None,
        frozen=BF16 if bf16 and cuda else FP32,
        experts=compute,
        attention="flash_attention_2" if cuda and bf16 and flash else "sdpa")


def _has_flash_attention() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def dtype(name: str):
    import torch

    return getattr(torch, name)


def mp_policy(p: PrecisionPlan):
    """The FSDP2 MixedPrecisionPolicy of the plan, or None (fp32 throughout)."""
    if p.fsdp_param is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype(p.fsdp_param), reduce_dtype=dtype(p.fsdp_reduce))


def autocast(p: PrecisionPlan):
    """A fresh autocast context for each forward (bf16 when the plan says so), else a no-op."""
    import contextlib

    import torch

    if not p.autocast:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if p.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def bf16_experts(model, p: PrecisionPlan) -> int:
    """Under autocast, run each mixture-of-experts block's experts with bf16 copies of their (fp32) weights and
    a bf16 input, since autocast leaves grouped matmuls alone; gradients reach the fp32 weights. Returns how
    many expert blocks were changed (0 when the plan computes in fp32 or FSDP2's policy casts already)."""
    if not p.autocast or p.experts != BF16:
        return 0
    n = 0
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if type(module).__name__.endswith("Experts") and any(w.ndim == 3 for w in own.values()):
            module.forward = _cast_forward(module, module.forward)
            n += 1
    return n


def _cast_forward(module, forward):
    import torch
    from torch.nn.utils.stateless import _reparametrize_module

    def run(hidden_states, *args, **kwargs):
        cast = {k: w.to(torch.bfloat16) for k, w in module.named_parameters(recurse=False)}
        args = tuple(a.to(torch.bfloat16) if torch.is_floating_point(a) else a for a in args)
        with _reparametrize_module(module, cast):
            out = forward(hidden_states.to(torch.bfloat16), *args, **kwargs)
        return out.to(hidden_states.dtype)

    return run
