"""The one training loop every stage shares.

AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation, clipping, bf16
autocast on GPU and fp32 on CPU, optional activation checkpointing, DDP or FSDP2 across processes.

The global batch of step s is a pure function of (seed, s): rows are read in a seeded permutation per
epoch, and each process takes its slice. The loss is the sum over scored tokens divided by the scored
tokens of the whole global batch, so 1 process and N processes (and any accumulation split) compute the
same gradient, and a resumed run repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.train import checkpoint
from appliance.train.config import TrainConfig
from appliance.train.data import IGNORE
from appliance.train.model import TrainError


@dataclass
class Dist:
    """Where this process sits: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """Set up torch.distributed when launched by torchrun (RANK/WORLD_SIZE set); single process otherwise."""
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if cuda else "cpu"
        if world > 1:
            import torch.distributed as dist

            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo")
            return cls(dist.get_rank(), world, local, device)
        return cls(0, 1, 0, device)

    def sum(self, x: float | int) -> float:
        if self.world == 1:
            return float(x)
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1 if flag else 0) > 0


def set_threads() -> None:
    """APPLIANCE_TRAIN_THREADS caps torch's threads in this process (tests on shared cores set 1)."""
    if threads := os.environ.get("APPLIANCE_TRAIN_THREADS"):
        import torch

        torch.set_num_threads(int(threads))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class Order:
    """The rows of each global batch: a seeded permutation per epoch, read in order."""

    def __init__(self, n_rows: int, seed: int):
        self.n, self.seed = n_rows, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def batch(self, step: int, size: int) -> np.ndarray:
        pos = step * size + np.arange(size)
        return np.array([self._perm(int(p // self.n))[int(p % self.n)] for p in pos], dtype=np.int64)


@dataclass
class FitResult:
    status: str  # done | interrupted
    step: int
    loss: float | None
    tokens: int
    seconds: float
    checkpoint: str | None
    model: object = None  # the trained (possibly DDP/FSDP-wrapped) model


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, at a checkpoint."""

    def __init__(self):
        self.set = False
        self._old: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            self.set = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: the caller owns signals
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def wrap(model, dist: Dist, cfg: TrainConfig):
    """DDP or FSDP2 across processes; activation checkpointing if asked."""
    if cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dist.world == 1:
        return model
    if cfg.parallel == "fsdp":
        if not hasattr(model, "set_requires_gradient_sync"):  # not yet sharded by `build_sharded`
            shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)


def shard(model) -> None:
    """FSDP2: each decoder layer a unit of its own, then the rest (embeddings, head) at the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        fully_shard(layer)
    fully_shard(model)


def build_sharded(config, build_full, dist: Dist):
    """An FSDP2 model whose full weights exist only once, on rank 0's host, never on every rank.

    Every rank builds the model on the meta device (no memory), shards it and allocates its shard; rank 0
    builds the full model on the CPU (`build_full()`) and its weights are broadcast shard by shard.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full = build_full() if dist.is_main else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shard(model)
    model.to_empty(device=dist.device)
    _reset_buffers(model, dist.device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full, state
    return model


def _reset_buffers(model, device) -> None:
    """Non-persistent buffers (rotary frequencies) are not in a state dict: recompute them after `to_empty`."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))


def make_optimizer(model, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel (CPU and CUDA) is the fastest AdamW; sharded (DTensor) parameters use the default.
    fused = not any(hasattr(p, "to_local") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def fit(model, rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], n_rows: int, cfg: TrainConfig,
        dist: Dist, ckpt_dir: Path, on_step: Callable[[dict], None], on_checkpoint: Callable[[int, str], None],
        resume_from: Path | None = None, aux_loss_coef: float = 0.0, state: dict | None = None,
        n_val: int = 0, objective=None) -> FitResult:
    """Train `model` (already on its device) for cfg.max_steps, checkpointing as it goes.

    Rows `n_rows .. n_rows + n_val` are the validation split: with cfg.eval_every its loss is measured and
    reported as `val_loss`; `on_step` may answer "finish" to end the run early as done (early stopping).
    With an `objective` (preference.DPO, grpo.GRPO) the loss is the mean of `objective.losses(model, x, y)`
    per row (a [chosen | rejected] pair, a prompt) instead of the mean next-token loss per scored token;
    its `set_step` and `step_metrics` (when it has them) see each step.
    """
    import torch
    import torch.nn.functional as F

    per_rank = cfg.batch_size // dist.world
    if per_rank * dist.world != cfg.batch_size or per_rank % cfg.micro_batch_size:
        raise TrainError(f"train.batch_size {cfg.batch_size} does not split into {dist.world} process(es) x "
                         f"micro batches of {cfg.micro_batch_size}",
                         "make batch_size a multiple of processes x micro_batch_size")
    model = wrap(model, dist, cfg)
    opt = make_optimizer(model, cfg)
    start, loss_val, last_ckpt = 0, None, None
    if resume_from is not None:
        resumed = checkpoint.load(resume_from, model, opt, dist.is_main, dist.world)
        start, loss_val, last_ckpt = resumed["step"], resumed.get("loss"), str(resume_from)
    if dist.world > 1 and dist.sum(start) != start * dist.world:  # e.g. a node without the checkpoint files
        raise TrainError(f"the processes disagree on the step to resume from (this one: {start})",
                         "every node needs the run's checkpoints at the same path")
    order = Order(n_rows, cfg.seed)
    cuda = dist.device.startswith("cuda")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    autocast = (lambda: torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    moe = aux_loss_coef > 0
    model.train()
    t_start = time.time()
    step, tokens_seen = start, 0
    finishing = False
    state = state or {}

    def save(at: int) -> None:
        nonlocal last_ckpt
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        if dist.any(any(not bool(torch.isfinite(p.detach()).all()) for p in local)):
            raise TrainError(f"the weights became non-finite at step {at}; not checkpointed"
                             f"{f' (the last good checkpoint is {last_ckpt})' if last_ckpt else ''}",
                             "lower train.lr or raise train.warmup_steps, then resume with --resume")
        path = checkpoint.save(ckpt_dir, at, model, opt, {**state, "loss": loss_val}, dist.is_main,
                               cfg.keep_checkpoints)
        if dist.is_main:
            last_ckpt = str(path)
            on_checkpoint(at, last_ckpt)

    with _StopFlag() as stop:
        while step < cfg.max_steps:
            t0 = time.time()
            index = order.batch(step, cfg.batch_size)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
            tok_np, lab_np = rows(index)
            x = torch.from_numpy(tok_np.astype(np.int64)).to(dist.device)  # (B, T)
            y = torch.from_numpy(lab_np.astype(np.int64)).to(dist.device)
            scored = dist.sum(len(index)) if objective else dist.sum(int((y[:, 1:] != IGNORE).sum()))
            if hasattr(objective, "set_step"):
                objective.set_step(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
            micro = range(0, per_rank, cfg.micro_batch_size)
            try:
                for j, s in enumerate(micro):
                    last = j == len(micro) - 1
                    with _no_sync(model, last), autocast():
                        xb, yb = x[s:s + cfg.micro_batch_size], y[s:s + cfg.micro_batch_size]
                        if objective is not None:
                            ce = objective.losses(model, xb, yb).sum()
                            loss = ce * dist.world / max(scored, 1.0)
                        else:
                            kw = {"output_router_logits": True} if moe else {}
                            out = model(input_ids=xb, use_cache=False, **kw)
                            logits = out.logits.float()  # (b, T, vocab); a no-op in fp32, no copy
                            # position t predicts token t+1: shift the labels, not the (large) logits
                            target = F.pad(yb[:, 1:], (0, 1), value=IGNORE)  # (b, T)
                            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
                            loss = ce * dist.world / max(scored, 1.0)
                            if moe and out.aux_loss is not None:
                                loss = loss + aux_loss_coef * out.aux_loss * len(xb) / per_rank
                    loss.backward()
                    loss_sum += ce.detach().double()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            except torch.OutOfMemoryError:
                raise TrainError(f"out of memory at step {step + 1}",
                                 "lower train.micro_batch_size or data.seq_len, or set "
                                 "train.activation_checkpointing = true; resume with --resume") from None
            loss_val = dist.sum(float(loss_sum)) / max(scored, 1.0)
            if not (math.isfinite(loss_val) and math.isfinite(norm)):
                raise TrainError(f"loss became {'NaN' if math.isnan(loss_val) else 'infinite'} at step {step + 1}"
                                 f"{f'; the last good checkpoint is {last_ckpt}' if last_ckpt else ''}",
                                 "lower train.lr or raise train.warmup_steps, then resume with --resume")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tok = cfg.batch_size * x.shape[1]
            tokens_seen += n_tok
            dt = time.time() - t0
            elapsed = time.time() - t_start
            metrics = {"step": step, "loss": loss_val, "lr": lr_at(step - 1, cfg), "grad_norm": norm,
                       "tokens": n_tok, "tokens_per_s": n_tok / dt if dt > 0 else 0.0, "elapsed": elapsed,
                       "eta": elapsed / (step - start) * (cfg.max_steps - step)}
            if hasattr(objective, "step_metrics"):
                metrics.update({k: (None if v is None else dist.sum(v) / dist.world)
                                for k, v in objective.step_metrics().items()})
            measure = n_val and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)
            metrics["val_loss"] = (validate(model, rows, n_rows, n_val, cfg, dist, autocast, objective) if measure
                                   else None)
            verdict = on_step(metrics) if dist.is_main else None
            if verdict is True:
                stop.set = True  # the launcher relays a Ctrl-C
            finishing = dist.any(verdict == "finish")  # early stopping: rank 0 decides for all
            stopping = dist.any(stop.set) or finishing
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
                save(step)
            if stopping:
                break
    status = "done" if step >= cfg.max_steps or finishing else "interrupted"
    return FitResult(status, step, loss_val, tokens_seen, time.time() - t_start, last_ckpt, model)


def validate(model, rows, n_rows: int, n_val: int, cfg: TrainConfig, dist: Dist, autocast, objective=None) -> float:
    """Mean loss per scored token (per row with an `objective`) over the validation rows, split across ranks.

    Every rank runs the same number of forward passes (FSDP gathers inside them); a rank with fewer rows
    repeats one and does not count it.
    """
    import torch
    import torch.nn.functional as F

    per = -(-n_val // dist.world)
    picks = [dist.rank + dist.world * k for k in range(per)]
    index = np.asarray([n_rows + (j if j < n_val else 0) for j in picks], np.int64)
    counted = np.asarray([j < n_val for j in picks])
    total, scored = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, per, cfg.micro_batch_size):
            tok_np, lab_np = rows(index[s:s + cfg.micro_batch_size])
            keep = torch.from_numpy(counted[s:s + cfg.micro_batch_size]).to(dist.device)
            x = torch.from_numpy(tok_np.astype(np.int64)).to(dist.device)
            y = torch.from_numpy(lab_np.astype(np.int64)).to(dist.device)
            if objective is not None:
                with autocast():
                    per_pair = getattr(objective, "val_losses", objective.losses)(model, x, y)
                total += float(per_pair[keep].sum())
                scored += int(keep.sum())
                continue
            with autocast():
                logits = model(input_ids=x, use_cache=False).logits.float()  # (b, T, vocab)
            target = F.pad(y[:, 1:], (0, 1), value=IGNORE)
            target[~keep] = IGNORE
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum")
            total += float(ce)
            scored += int((target != IGNORE).sum())
    model.train()
    return dist.sum(total) / max(dist.sum(scored), 1)


def _no_sync(model, last: bool):
    """Skip the gradient all-reduce on all but the last micro batch of a step."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model):
    return getattr(model, "module", model)
