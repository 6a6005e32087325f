"""The one training loop every stage shares.

AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation, clipping, bf16 on GPU
(autocast, or FSDP2's mixed-precision policy; see `precision`) and fp32 on CPU, optional activation
checkpointing, DDP or FSDP2 across processes.

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

from appliance.train import checkpoint, precision
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


def wrap(model, dist: Dist, cfg: TrainConfig, plan: precision.PrecisionPlan | None = None):
    """DDP or FSDP2 across processes (FSDP2 with the plan's mixed-precision policy); activation checkpointing if
    asked."""
    if cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dist.world == 1:
        return model
    if cfg.parallel == "fsdp" or hasattr(model, "set_requires_gradient_sync"):  # auto: the stage chose FSDP
        if not hasattr(model, "set_requires_gradient_sync"):  # not yet sharded by `build_sharded`
            shard(model, precision.mp_policy(plan) if plan else None)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)


def shard(model, policy=None) -> None:
    """FSDP2: each decoder layer a unit of its own, then the rest (embeddings, head) at the root; `policy` a
    MixedPrecisionPolicy (bf16 weights in compute, fp32 gradient reduction) or None (fp32)."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": policy} if policy is not None else {}
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def build_sharded(config, build_full, dist: Dist, plan: precision.PrecisionPlan | None = None):
    """An FSDP2 model whose full weights exist only once, on rank 0's host, never on every rank.

    Every rank builds the model on the meta device (no memory), shards it and allocates its shard; rank 0
    builds the full model on the CPU (`build_full()`) and its weights are broadcast shard by shard.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full = build_full() if dist.is_main else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=plan.attention if plan else "sdpa")
    shard(model, precision.mp_policy(plan) if plan else None)
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
        n_val: int = 0, objective=None, positions=None) -> FitResult:
    """Train `model` (already on its device) for cfg.max_steps, checkpointing as it goes.

    `positions(tokens, labels)` gives the position ids of packed rows (`data.position_rule`): passed to the
    model, they keep the documents of a row from attending to each other. None: one sequence per row.

    Rows `n_rows .. n_rows + n_val` are the validation split: with cfg.eval_every its loss is measured and
    reported as `val_loss`; `on_step` may answer "finish" to end the run early as done (early stopping).
    With an `objective` (preference.DPO, grpo.GRPO) the loss is the mean of `objective.losses(model, x, y)`
    per row (a [chosen | rejected] pair, a prompt) instead of the mean next-token loss per scored token;
    its `set_step` and `step_metrics` (when it has them) see each step.
    """
    run = _Training(model, rows, n_rows, cfg, dist, ckpt_dir, on_step, on_checkpoint, resume_from, aux_loss_coef,
                    state or {}, n_val, objective, positions)
    with _StopFlag() as stop:
        while run.step < cfg.max_steps:
            t0 = time.time()
            stats = run.train_step()
            metrics = run.step_metrics(stats, t0)
            metrics["val_loss"] = run.validation()
            stopping = run.report(metrics, stop)
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.max_steps or stopping:
                run.checkpoint()
            if stopping:
                break
    return run.result()


@dataclass
class StepStats:
    """What one optimizer step measured, over the global batch."""

    loss: float
    """Mean loss per scored token (per row with an objective)."""
    grad_norm: float
    """The gradient norm before clipping."""
    tokens: int
    """Tokens in the global batch, padding included."""


class _Training:
    """One `fit` in progress: the wrapped model, its optimizer and where the run stands (step, loss, checkpoint).

    Built in the order the processes must agree on: the batch split checked, the model wrapped (DDP/FSDP), the
    optimizer made, the checkpoint to resume from loaded.
    """

    def __init__(self, model, rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], n_rows: int,
                 cfg: TrainConfig, dist: Dist, ckpt_dir: Path, on_step: Callable[[dict], None],
                 on_checkpoint: Callable[[int, str], None], resume_from: Path | None, aux_loss_coef: float,
                 state: dict, n_val: int, objective, positions=None):
        self.per_rank = cfg.batch_size // dist.world
        if self.per_rank * dist.world != cfg.batch_size or self.per_rank % cfg.micro_batch_size:
            raise TrainError(f"train.batch_size {cfg.batch_size} does not split into {dist.world} process(es) x "
                             f"micro batches of {cfg.micro_batch_size}",
                             "make batch_size a multiple of processes x micro_batch_size")
        self.rows, self.n_rows, self.n_val, self.cfg, self.dist = rows, n_rows, n_val, cfg, dist
        self.ckpt_dir, self.on_step, self.on_checkpoint = ckpt_dir, on_step, on_checkpoint
        self.state, self.objective, self.aux_loss_coef = state, objective, aux_loss_coef
        self.positions = positions
        sharded = hasattr(model, "set_requires_gradient_sync") or (dist.world > 1 and cfg.parallel == "fsdp")
        self.plan = precision.plan(dist.device, cfg.precision, fsdp=sharded)
        precision.bf16_experts(unwrap(model), self.plan)
        self.model = wrap(model, dist, cfg, self.plan)
        self.opt = make_optimizer(self.model, cfg)
        self.start, self.loss, self.last_ckpt = 0, None, None
        self._resume(resume_from)
        self.step, self.tokens_seen, self.finishing = self.start, 0, False
        self.order = Order(n_rows, cfg.seed)
        self.autocast = lambda: precision.autocast(self.plan)  # no autocast under FSDP2's policy, nor in fp32
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        self.t_start = time.time()

    def _resume(self, resume_from: Path | None) -> None:
        """Load model, optimizer and RNG from a checkpoint; every process must resume from the same step."""
        dist = self.dist
        if resume_from is not None:
            resumed = checkpoint.load(resume_from, self.model, self.opt, dist.is_main, dist.world)
            self.start, self.loss, self.last_ckpt = resumed["step"], resumed.get("loss"), str(resume_from)
        if dist.world > 1 and dist.sum(self.start) != self.start * dist.world:  # e.g. a node without the files
            raise TrainError(f"the processes disagree on the step to resume from (this one: {self.start})",
                             "every node needs the run's checkpoints at the same path")

    def _batch(self, step: int):
        """This process's slice of the global batch of `step`, on its device: (tokens, labels, positions), each
        (B, T); positions None when each row is one sequence."""
        dist, per_rank = self.dist, self.per_rank
        index = self.order.batch(step, self.cfg.batch_size)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        return to_device(*self.rows(index), self.positions, dist.device)

    def _micro_loss(self, xb, yb, scored: float, pb=None):
        """(loss to backpropagate, summed loss for the report) of one micro batch.

        The loss is scaled by the global batch's scored tokens (rows with an objective) times the world size,
        so the gradients DDP/FSDP average over processes sum to the gradient of the global mean.
        """
        import torch.nn.functional as F

        dist = self.dist
        if self.objective is not None:
            ce = self.objective.losses(self.model, xb, yb).sum()
            return ce * dist.world / max(scored, 1.0), ce
        moe = self.aux_loss_coef > 0
        kw = {"output_router_logits": True} if moe else {}
        out = self.model(input_ids=xb, position_ids=pb, use_cache=False, **kw)
        logits = out.logits.float()  # (b, T, vocab); a no-op in fp32, no copy
        # position t predicts token t+1: shift the labels, not the (large) logits
        target = F.pad(yb[:, 1:], (0, 1), value=IGNORE)  # (b, T)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                             reduction="sum")
        loss = ce * dist.world / max(scored, 1.0)
        if moe and out.aux_loss is not None:
            loss = loss + self.aux_loss_coef * out.aux_loss * len(xb) / self.per_rank
        return loss, ce

    def train_step(self) -> StepStats:
        """One optimizer step: forward and backward per micro batch (gradients accumulate and are synced on the
        last), clip, refuse a non-finite loss or norm, AdamW step at the scheduled learning rate."""
        import torch

        cfg, dist, step = self.cfg, self.dist, self.step
        x, y, pos = self._batch(step)
        scored = dist.sum(len(x)) if self.objective else dist.sum(int((y[:, 1:] != IGNORE).sum()))
        if hasattr(self.objective, "set_step"):
            self.objective.set_step(step)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        micro = range(0, self.per_rank, cfg.micro_batch_size)
        try:
            for j, s in enumerate(micro):
                part = slice(s, s + cfg.micro_batch_size)
                # the backward runs inside no-sync too: DDP's all-reduce and FSDP's reduce-scatter happen in it
                with _no_sync(self.model, j == len(micro) - 1):
                    with self.autocast():
                        loss, ce = self._micro_loss(x[part], y[part], scored, None if pos is None else pos[part])
                    loss.backward()
                loss_sum += ce.detach().double()
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        except torch.OutOfMemoryError:
            raise TrainError(f"out of memory at step {step + 1}",
                             "lower train.micro_batch_size or data.seq_len, or set "
                             "train.activation_checkpointing = true; resume with --resume") from None
        loss_val = dist.sum(float(loss_sum)) / max(scored, 1.0)
        if not (math.isfinite(loss_val) and math.isfinite(norm)):
            raise TrainError(f"loss became {'NaN' if math.isnan(loss_val) else 'infinite'} at step {step + 1}"
                             f"{f'; the last good checkpoint is {self.last_ckpt}' if self.last_ckpt else ''}",
                             "lower train.lr or raise train.warmup_steps, then resume with --resume")
        self.loss = loss_val
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        n_tok = cfg.batch_size * x.shape[1]
        self.tokens_seen += n_tok
        return StepStats(loss_val, norm, n_tok)

    def step_metrics(self, stats: StepStats, t0: float) -> dict:
        """The step's report (speed and ETA from `t0`, when the step began), the objective's own numbers
        averaged over processes."""
        cfg, step = self.cfg, self.step
        dt = time.time() - t0
        elapsed = time.time() - self.t_start
        metrics = {"step": step, "loss": stats.loss, "lr": lr_at(step - 1, cfg), "grad_norm": stats.grad_norm,
                   "tokens": stats.tokens, "tokens_per_s": stats.tokens / dt if dt > 0 else 0.0, "elapsed": elapsed,
                   "eta": elapsed / (step - self.start) * (cfg.max_steps - step)}
        if hasattr(self.objective, "step_metrics"):
            metrics.update({k: (None if v is None else self.dist.sum(v) / self.dist.world)
                            for k, v in self.objective.step_metrics().items()})
        return metrics

    def validation(self) -> float | None:
        """The validation loss when it is due (every cfg.eval_every steps and at the last), else None."""
        cfg, step = self.cfg, self.step
        measure = self.n_val and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)
        if not measure:
            return None
        return validate(self.model, self.rows, self.n_rows, self.n_val, cfg, self.dist, self.autocast, self.objective,
                        self.positions)

    def report(self, metrics: dict, stop: _StopFlag) -> bool:
        """Rank 0 reports the step; True when every process is to stop now: asked to (Ctrl-C or SIGTERM here,
        or relayed by the launcher), or finishing early as done (early stopping: rank 0 decides for all)."""
        dist = self.dist
        verdict = self.on_step(metrics) if dist.is_main else None
        if verdict is True:
            stop.set = True  # the launcher relays a Ctrl-C
        self.finishing = dist.any(verdict == "finish")
        return dist.any(stop.set) or self.finishing

    def checkpoint(self) -> None:
        """Checkpoint the current step (every process takes part, rank 0 writes and tells `on_checkpoint`);
        refused when the weights are no longer finite."""
        import torch

        at, dist = self.step, self.dist
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        if dist.any(any(not bool(torch.isfinite(p.detach()).all()) for p in local)):
            raise TrainError(f"the weights became non-finite at step {at}; not checkpointed"
                             f"{f' (the last good checkpoint is {self.last_ckpt})' if self.last_ckpt else ''}",
                             "lower train.lr or raise train.warmup_steps, then resume with --resume")
        path = checkpoint.save(self.ckpt_dir, at, self.model, self.opt, {**self.state, "loss": self.loss},
                               dist.is_main, self.cfg.keep_checkpoints)
        if dist.is_main:
            self.last_ckpt = str(path)
            self.on_checkpoint(at, self.last_ckpt)

    def result(self) -> FitResult:
        """Done when every step ran or early stopping finished the run; interrupted otherwise."""
        status = "done" if self.step >= self.cfg.max_steps or self.finishing else "interrupted"
        return FitResult(status, self.step, self.loss, self.tokens_seen, time.time() - self.t_start, self.last_ckpt,
                         self.model)


def to_device(tok_np: np.ndarray, lab_np: np.ndarray, positions, device: str):
    """Rows as (tokens, labels, positions) tensors on `device`, each (B, T); positions None without a rule."""
    import torch

    x = torch.from_numpy(tok_np.astype(np.int64)).to(device)
    y = torch.from_numpy(lab_np.astype(np.int64)).to(device)
    pos = None if positions is None else torch.from_numpy(positions(tok_np, lab_np)).to(device)
    return x, y, pos


def validate(model, rows, n_rows: int, n_val: int, cfg: TrainConfig, dist: Dist, autocast, objective=None,
             positions=None) -> float:
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
            keep = torch.from_numpy(counted[s:s + cfg.micro_batch_size]).to(dist.device)
            x, y, pos = to_device(*rows(index[s:s + cfg.micro_batch_size]), positions, dist.device)
            if objective is not None:
                with autocast():
                    per_pair = getattr(objective, "val_losses", objective.losses)(model, x, y)
                total += float(per_pair[keep].sum())
                scored += int(keep.sum())
                continue
            with autocast():
                logits = model(input_ids=x, position_ids=pos, use_cache=False).logits.float()  # (b, T, vocab)
            target = F.pad(y[:, 1:], (0, 1), value=IGNORE)
            target[~keep] = IGNORE
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum")
            total += float(ce)
            scored += int((target != IGNORE).sum())
    model.train()
    return dist.sum(total) / max(dist.sum(scored), 1)


def _no_sync(model, last: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last micro batch of a step:
    gradients accumulate locally and are synced once per optimizer step. Forward and backward run inside."""
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
