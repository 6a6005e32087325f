"""One GPU, under 10 minutes: does the training path do on a GPU what the CPU tests say it will?

    python benchmarks/gpu_smoke.py [--steps 10] [--smoke]

Prints one JSON object. Parts (each reports its own error instead of stopping the others):
  dense       dense-1b-shaped pre-training steps as the recipe runs them (bf16 autocast, no activation
              checkpointing, each decoder layer compiled, the chunked cross-entropy, the loss read once at the
              end, micro batch 8 x 2048, 32k vocabulary) through the shared loop: tokens/s, MFU against the
              GPU's bf16 peak, peak memory, the compile time (in the warm-up, not in tokens/s)
  fsdp        FSDP2 at world size 1 with MixedPrecisionPolicy(bf16, fp32): 4 steps, and 2 + 2 with a sharded
              checkpoint and a resume in between; the losses must be identical
  moe         a mixture-of-experts step under the plan: the dtypes the experts' matmul kernels receive
  qlora       a 4-bit NF4 base with LoRA adapters: one step, the dtypes of base and adapters
  packing     a document's logits alone and packed after another (flash-attention varlen or SDPA mask)
  precision   the plan (`appliance.train.precision.plan`) for this device
Without a GPU it says so and exits 0, having measured nothing. --smoke runs every part at tiny shapes on
whatever device there is (the CPU: seconds), a check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense bf16 FLOP/s
DENSE_1B = dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                max_seq_len=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256)


class Vocab:
    """A tokenizer as `model.hf_config` reads it."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n


def part(fn, *args):
    """Run one part; its result, or its error as one line (and the traceback's last lines)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - each part reports its own failure; the others still run
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                "where": traceback.format_exc().strip().splitlines()[-3:]}


def rows_of(n: int, seq: int, vocab: int):
    import numpy as np

    tokens = np.random.default_rng(0).integers(3, vocab, (n, seq)).astype(np.int32)
    return lambda index: (tokens[index], tokens[index])


def train_cfg(steps: int, batch: int, micro: int, **kw):
    from appliance.train.config import TrainConfig

    return TrainConfig(max_steps=steps, batch_size=batch, micro_batch_size=micro, warmup_steps=1, lr=3e-4,
                       min_lr=3e-5, checkpoint_every=10**6, **kw)


def peak_flops(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dense(device: str, smoke: bool, steps: int) -> dict:
    """dense-1b-shaped steps through `loop._Training`: tokens/s and MFU (6 N + attention FLOPs per token)."""
    import torch

    from appliance.train import loop
    from appliance.train.config import ModelConfig
    from appliance.train.model import count_parameters, new_model

    shape, vocab, seq, micro = (TINY, 512, 64, 2) if smoke else (DENSE_1B, 32000, 2048, 8)
    m = ModelConfig(**shape)
    model = new_model(m, Vocab(vocab), 0).to(device)
    cfg = train_cfg(steps + 2, micro, micro, activation_checkpointing="none", compile="auto")
    t0 = time.perf_counter()
    run = loop._Training(model, rows_of(64, seq, vocab), 64, cfg, loop.Dist(device=device), None,
                         lambda s: None, lambda *a: None, None, 0.0, {}, 0, None)
    for _ in range(2):  # warm-up: allocator, kernels, and the layers' compile
        run.train_step()
    warmup = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    pending = [run.train_step_async() for _ in range(steps)]  # as `fit` runs them: no read of the loss per step
    stats = run._read(pending)[-1]
    dt = (time.perf_counter() - t0) / steps
    run.close()
    n = count_parameters(m, vocab)["total"]
    flops_per_token = 6 * n + 12 * m.num_layers * m.hidden_size * seq  # weights + causal attention (fwd+bwd)
    tokens_s = micro * seq / dt
    peak = peak_flops(device)
    out = {"params": n, "seq_len": seq, "micro_batch": micro, "step_s": round(dt, 4), "tokens_per_s": round(tokens_s),
           "loss": round(stats.loss, 4), "autocast": run.plan.autocast, "compute": run.plan.compute,
           "attention": run.plan.attention, "chunked_loss": run.chunked, "warmup_s": round(warmup, 1),
           "compiled": loop.compile_wanted(cfg.compile, device), "activation_checkpointing": "none"}
    if peak:
        out["mfu"] = round(flops_per_token * tokens_s / peak, 4)
    if device.startswith("cuda"):
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def fsdp(device: str, smoke: bool) -> dict:
    """FSDP2 at world size 1, bf16 policy: 4 steps straight, and 2 + checkpoint + resume + 2, same losses."""
    import torch
    import torch.distributed as tdist

    from appliance.train import checkpoint, loop, precision
    from appliance.train.config import ModelConfig
    from appliance.train.model import new_model

    shape = TINY if smoke else {**DENSE_1B, "num_layers": 4}
    vocab, seq = (512, 64) if smoke else (32000, 1024)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SMOKE_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        dist = loop.Dist(0, 1, 0, device)
        plan = precision.plan(device, "auto", fsdp=True)
        rows = rows_of(32, seq, vocab)

        def training(root: Path, steps: int, resume: Path | None = None):
            model = new_model(ModelConfig(**shape), Vocab(vocab), 0)
            loop.shard(model, precision.mp_policy(plan))
            model.to(device)
            return loop._Training(model, rows, 32, train_cfg(steps, 4, 2), dist, root, lambda s: None,
                                  lambda *a: None, resume, 0.0, {}, 0, None)

        with tempfile.TemporaryDirectory() as tmp:
            whole = training(Path(tmp) / "a", 4)
            straight = [whole.train_step().loss for _ in range(4)]
            first = training(Path(tmp) / "b", 4)
            halves = [first.train_step().loss for _ in range(2)]
            first.checkpoint()
            first.settle()  # on a GPU the checkpoint is written in the background: wait until it is in place
            ck = checkpoint.latest(Path(tmp) / "b")
            files = sorted(p.name for p in ck.iterdir())
            second = training(Path(tmp) / "b", 4, ck)
            halves += [second.train_step().loss for _ in range(2)]
        dtypes = sorted({str(p.dtype) for p in second.model.parameters()})
        return {"losses": straight, "resumed": halves, "resume_identical": straight == halves,
                # what two fresh runs differ by before the checkpoint (a GPU's kernels need not be deterministic),
                # and what the resumed steps differ by from the straight run's
                "fresh_max_diff": max(abs(a - b) for a, b in zip(straight[:2], halves[:2])),
                "resumed_max_diff": max(abs(a - b) for a, b in zip(straight[2:], halves[2:])),
                "policy": {"param": plan.fsdp_param, "reduce": plan.fsdp_reduce}, "autocast": second.plan.autocast,
                "master_dtypes": dtypes, "checkpoint_files": files}
    finally:
        tdist.destroy_process_group()
        torch.manual_seed(0)


def moe(device: str, smoke: bool) -> dict:
    """One MoE step under the plan (autocast + bf16 experts on a GPU); the experts' kernels' dtypes."""
    import torch
    from torch.overrides import TorchFunctionMode

    from appliance.train import loop
    from appliance.train.config import ModelConfig
    from appliance.train.model import new_model

    shape = {**TINY, "arch": "moe", "num_experts": 4} if smoke else {
        **DENSE_1B, "arch": "moe", "num_layers": 2, "intermediate_size": 1536, "num_experts": 8}
    vocab, seq = (512, 64) if smoke else (32000, 2048)
    model = new_model(ModelConfig(**shape), Vocab(vocab), 0).to(device)
    seen: set = set()
    kernels = {torch.nn.functional.linear, torch.matmul, torch.bmm}
    kernels |= {f for f in (getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None)) if f}

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in kernels:
                seen.add((getattr(func, "__name__", str(func)), str(args[0].dtype), str(args[1].dtype)))
            return func(*args, **(kwargs or {}))

    mode = Log()
    cfg = train_cfg(1, 2, 2, precision="bf16")
    run = loop._Training(model, rows_of(8, seq, vocab), 8, cfg, loop.Dist(device=device), None, lambda s: None,
                         lambda *a: None, None, 0.02, {}, 0, None)
    for m in model.modules():
        if type(m).__name__.endswith("Experts"):
            m.register_forward_pre_hook(lambda *a: [mode.__enter__()] and None)
            m.register_forward_hook(lambda *a: mode.__exit__(None, None, None) and None)
    stats = run.train_step()
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    return {"loss": round(stats.loss, 4), "expert_kernels": sorted(seen),
            "expert_masters": sorted({str(p.dtype) for p in experts.parameters()})}


def qlora(device: str, smoke: bool) -> dict:
    """A 4-bit base with LoRA adapters: one step; base and adapter dtypes."""
    import torch

    from appliance.train import loop, precision
    from appliance.train.config import LoraConfig, ModelConfig
    from appliance.train.model import load_base, new_model

    shape = TINY if smoke else {**DENSE_1B, "num_layers": 4}
    vocab, seq = (512, 64) if smoke else (32000, 1024)
    plan = precision.plan(device)
    with tempfile.TemporaryDirectory() as tmp:
        new_model(ModelConfig(**shape), Vocab(vocab), 0).save_pretrained(tmp)
        model = load_base(Path(tmp), "qlora", LoraConfig(), device, plan.frozen, plan.attention)
    run = loop._Training(model, rows_of(8, seq, vocab), 8, train_cfg(1, 2, 2), loop.Dist(device=device), None,
                         lambda s: None, lambda *a: None, None, 0.0, {}, 0, None)
    stats = run.train_step()
    kinds = {}
    for name, p in model.named_parameters():
        kinds.setdefault("adapter" if "lora_" in name else "base", set()).add(str(p.dtype))
    return {"loss": round(stats.loss, 4), "dtypes": {k: sorted(v) for k, v in kinds.items()},
            "finite": bool(torch.isfinite(torch.tensor(stats.loss)))}


def packing(device: str, smoke: bool) -> dict:
    """Document B's logits alone and packed after document A (the attention the plan picks)."""
    import numpy as np
    import torch

    from appliance.train import loop, precision
    from appliance.train.config import DataConfig, ModelConfig
    from appliance.train.data import position_rule
    from appliance.train.model import new_model

    plan = precision.plan(device)
    model = new_model(ModelConfig(**TINY), Vocab(512), 0, plan.attention).to(device).eval()
    rule = position_rule(DataConfig(format="text"), Vocab.eos_token_id)
    rng = np.random.default_rng(1)
    a, b = np.append(rng.integers(3, 512, 20), 2), np.append(rng.integers(3, 512, 30), 2)
    row = np.concatenate([a, b])[None]

    def logits(tokens):
        x, _, pos = loop.to_device(tokens, tokens, rule, device)
        with torch.no_grad(), precision.autocast(plan):
            return model(input_ids=x, position_ids=pos, use_cache=False).logits.float()[0]

    diff = float((logits(row)[len(a):] - logits(b[None])).abs().max())
    return {"attention": plan.attention, "max_abs_diff": diff, "isolated": diff < (5e-2 if plan.autocast else 1e-4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="measured dense steps (after 2 warm-up steps)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device: a check that it runs")
    args = ap.parse_args(argv)
    import torch

    from appliance.train import precision
    from appliance.train.model import quiet

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(json.dumps({"gpu": False, "note": "no GPU: nothing measured (--smoke runs the parts on the CPU)"}))
        return 0
    quiet()
    torch.set_num_threads(int(os.environ.get("APPLIANCE_TRAIN_THREADS", "0")) or torch.get_num_threads())
    device = "cuda:0" if cuda else "cpu"
    t0 = time.time()
    out: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else False, "smoke": args.smoke,
                 "torch": torch.__version__, "precision": vars(precision.plan(device))}
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints stay off the JSON
        out["dense"] = part(dense, device, args.smoke, 2 if args.smoke else args.steps)
        out["fsdp"] = part(fsdp, device, args.smoke)
        out["moe"] = part(moe, device, args.smoke)
        out["qlora"] = part(qlora, device, args.smoke)
        out["packing"] = part(packing, device, args.smoke)
    out["seconds"] = round(time.time() - t0, 1)
    out["ok"] = all("error" not in out[k] for k in ("dense", "fsdp", "moe", "qlora", "packing"))
    print(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
