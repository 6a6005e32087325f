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

from appliance.train import checkpoint, loss, precision
from appliance.train.config import TrainConfig, checkpointing_mode
from appliance.train.data import IGNORE
from appliance.train.model import TrainError


@dataclass
class Dist:
    """Where this process sits: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    nnodes: int = 1
    """Nodes of the run (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE): FSDP2 shards within a node, replicates across."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_size(self) -> int:
        """Processes one FSDP2 shard group spans: those of one node (`mesh_shape`)."""
        return mesh_shape(self.world, self.nnodes)[-1]

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
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            return cls(dist.get_rank(), world, local, device, max(world // max(per_node, 1), 1))
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
    """DDP or FSDP2 across processes (FSDP2 with the plan's mixed-precision policy); activation checkpointing and
    per-layer compile as the recipe asks."""
    checkpoint_layers(model, checkpointing_mode(cfg.activation_checkpointing))
    if compile_wanted(cfg.compile, dist.device):
        compile_layers(model)
    if dist.world == 1:
        return model
    if cfg.parallel == "fsdp" or hasattr(model, "set_requires_gradient_sync"):  # auto: the stage chose FSDP
        if not hasattr(model, "set_requires_gradient_sync"):  # not yet sharded by `build_sharded`
            shard(model, precision.mp_policy(plan) if plan else None, device_mesh(dist))
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' checkpointable layers), in order, through any PEFT wrapper."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model, mode: str) -> int:
    """Activation checkpointing: "full" recomputes every decoder layer in the backward, "selective" every other one
    (half the saving for half the recompute), "none" none. Returns how many layers recompute."""
    if mode == "none" or not hasattr(model, "gradient_checkpointing_enable"):
        return 0
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name for it
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    if mode == "selective":
        for layer in layers[1::2]:  # the flag is read per layer at each forward
            layer.gradient_checkpointing = False
    return sum(layer.gradient_checkpointing for layer in layers)


def compile_wanted(setting: str, device: str) -> bool:
    """train.compile: "on", "off", or "auto" (on a GPU only: compiling costs about a minute at start, which a
    long GPU run earns back and a CPU test or demo does not)."""
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def compile_layers(model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place (one graph per layer shape, reused by every layer; the loss
    and the rest stay eager, as torchtitan does). Returns how many layers were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def mesh_shape(world: int, nnodes: int = 1) -> tuple[int, ...]:
    """The FSDP2 device mesh: (world,) on one node, sharding across every process; with several nodes
    (replicas, shards) = (nodes, processes per node), HSDP: each node holds a whole sharded copy, so the
    parameter gathers of every layer stay on the node's NVLink and only the gradient all-reduce (once a step,
    between replicas) crosses the slower network between nodes."""
    if nnodes > 1 and world % nnodes == 0 and world // nnodes > 1:
        return (nnodes, world // nnodes)
    return (world,)


def device_mesh(dist: Dist):
    """The device mesh of `mesh_shape` for this run (None on one process: FSDP2's default, all processes)."""
    shape = mesh_shape(dist.world, dist.nnodes)
    if len(shape) == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if dist.device.startswith("cuda") else "cpu", shape,
                            mesh_dim_names=("replicate", "shard"))


def shard(model, policy=None, mesh=None) -> None:
    """FSDP2: each decoder layer a unit of its own, then the rest (embeddings, head) at the root; `policy` a
    MixedPrecisionPolicy (bf16 weights in compute, fp32 gradient reduction) or None (fp32); `mesh` a 2-D
    (replicate, shard) mesh for HSDP across nodes, or None (shard across every process)."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": policy} if policy is not None else {}
    if mesh is not None:
        kw["mesh"] = mesh
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
    shard(model, precision.mp_policy(plan) if plan else None, device_mesh(dist))
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
    its `set_step` and `step_metrics` (when it has them) see each step, its `prepare` (when it has one) the
    model and the rows once before the first step.

    The loss and gradient norm stay on the device and are read every `sync_every` steps (`sync_interval`), and
    before every checkpoint and validation: then each step of the span is reported in order.
    """
    run = _Training(model, rows, n_rows, cfg, dist, ckpt_dir, on_step, on_checkpoint, resume_from, aux_loss_coef,
                    state or {}, n_val, objective, positions)
    every = sync_interval(cfg, dist.device)
    try:
        with _StopFlag() as stop:
            while run.step < cfg.max_steps:
                run.pending.append(run.train_step_async())
                due_ckpt = run.step % cfg.checkpoint_every == 0 or run.step == cfg.max_steps
                if not (due_ckpt or run.validation_due() or run.step % every == 0):
                    continue
                stopping = run.flush(stop)
                if due_ckpt or stopping:
                    run.checkpoint()
                if stopping:
                    break
        run.settle()  # the checkpoint still being written, if any, is in place before the run ends
    finally:
        run.close()
    return run.result()


def async_checkpoints(cfg: TrainConfig, device: str) -> bool:
    """train.checkpoint_async: "on", "off", or "auto" (on a GPU, where the steps are worth not waiting for the
    disk; on a CPU the copy to host memory saves nothing)."""
    return cfg.checkpoint_async == "on" or (cfg.checkpoint_async == "auto" and device.startswith("cuda"))


def sync_interval(cfg: TrainConfig, device: str) -> int:
    """Steps between reads of the loss to the host: train.sync_every, or 10 on a GPU and 1 on a CPU (where a
    read costs nothing and a NaN is caught before the optimizer step)."""
    return cfg.sync_every or (10 if device.startswith("cuda") else 1)


@dataclass
class StepStats:
    """What one optimizer step measured, over the global batch."""

    loss: float
    """Mean loss per scored token (per row with an objective)."""
    grad_norm: float
    """The gradient norm before clipping."""
    tokens: int
    """Tokens in the global batch, padding included."""


@dataclass
class _Pending:
    """A step whose numbers are still on the device: summed loss and scored tokens of this process (scored
    already summed over processes), the global gradient norm."""

    step: int
    loss_sum: object
    scored: object
    norm: object
    tokens: int
    t0: float
    stats: StepStats | None = None
    """The numbers on the host, once read."""


@dataclass
class _Batch:
    """This process's slice of a step's global batch, on its device: tokens, labels, positions (B, T) (None
    when each row is one sequence), the rows' indices, and the scored tokens (counted on the host)."""

    x: object
    y: object
    pos: object
    index: np.ndarray
    scored: int


class _Prefetch:
    """The next step's rows, fetched on a background thread while this step computes: read from the launcher,
    packed positions built, and on a GPU copied into pinned memory so the copy to the device does not block."""

    def __init__(self, fetch: Callable[[int], tuple], device: str):
        from concurrent.futures import ThreadPoolExecutor

        self.fetch, self.device = fetch, device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rows")
        self.ahead: dict = {}

    def get(self, step: int):
        future = self.ahead.pop(step, None)
        return future.result() if future is not None else self.fetch(step)

    def start(self, step: int) -> None:
        self.ahead[step] = self.pool.submit(self.fetch, step)

    def close(self) -> None:
        self.ahead.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


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
        self.chunked = objective is None and loss.supports(self.model)
        self.opt = make_optimizer(self.model, cfg)
        self.start, self.loss, self.last_ckpt = 0, None, None
        self._resume(resume_from)
        self.step, self.tokens_seen, self.finishing = self.start, 0, False
        self.order = Order(n_rows, cfg.seed)
        self.autocast = lambda: precision.autocast(self.plan)  # no autocast under FSDP2's policy, nor in fp32
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.pending: list[_Pending] = []
        self.prefetch = _Prefetch(self._fetch, dist.device)
        self.saving: checkpoint.Saving | None = None  # a checkpoint being written in the background
        self.ckpt_group = None
        if async_checkpoints(cfg, dist.device) and checkpoint.distributed():
            import torch.distributed

            # its collectives apart from the training's, on a group of its own on gloo: async_save needs one with
            # a CPU backend, and the training's may be NCCL alone (also at world size 1, where FSDP2 still needs a
            # process group)
            self.ckpt_group = torch.distributed.new_group(backend="gloo")
        if hasattr(objective, "prepare"):  # e.g. DPO's reference log-probabilities, once for every row
            objective.prepare(self.model, rows, n_rows + n_val, cfg.micro_batch_size, dist, self.autocast)
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

    def _fetch(self, step: int) -> tuple:
        """(index, tokens, labels, positions, scored) of this process's slice of `step`'s batch, on the host (in
        pinned memory on a GPU); runs on the prefetch thread."""

        dist, per_rank = self.dist, self.per_rank
        index = self.order.batch(step, self.cfg.batch_size)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        tok, lab = self.rows(index)
        x, y, pos = to_tensors(tok, lab, self.positions)
        if dist.device.startswith("cuda"):
            x, y, pos = x.pin_memory(), y.pin_memory(), None if pos is None else pos.pin_memory()
        return index, x, y, pos, int((lab[:, 1:] != IGNORE).sum())

    def _batch(self, step: int) -> _Batch:
        """This process's slice of the global batch of `step`, on its device (fetched ahead on a thread); the
        next step's fetch starts here."""
        index, x, y, pos, scored = self.prefetch.get(step)
        if step + 1 < self.cfg.max_steps:
            self.prefetch.start(step + 1)
        device = self.dist.device
        move = (lambda t: t.to(device, non_blocking=True)) if device != "cpu" else (lambda t: t)
        return _Batch(move(x), move(y), None if pos is None else move(pos), index, scored)

    def _micro_loss(self, xb, yb, scale, pb=None, index=None):
        """(loss to backpropagate, summed loss for the report) of one micro batch.

        The loss is scaled by `scale`: world size / the global batch's scored tokens (rows with an objective),
        so the gradients DDP/FSDP average over processes sum to the gradient of the global mean.
        """
        import torch.nn.functional as F

        if self.objective is not None:
            if hasattr(self.objective, "set_rows"):
                self.objective.set_rows(index)
            ce = self.objective.losses(self.model, xb, yb).sum()
            return ce * scale, ce
        moe = self.aux_loss_coef > 0
        kw = {"output_router_logits": True} if moe else {}
        # position t predicts token t+1: shift the labels, not the (large) logits
        target = F.pad(yb[:, 1:], (0, 1), value=IGNORE)  # (b, T)
        out, ce = next_token_loss(self.model, xb, pb, target, self.chunked, **kw)
        total = ce * scale
        if moe and out.aux_loss is not None:
            total = total + self.aux_loss_coef * out.aux_loss * len(xb) / self.per_rank
        return total, ce

    def train_step(self) -> StepStats:
        """One optimizer step, its numbers read at once (see `train_step_async`)."""
        return self._read([self.train_step_async()])[0]

    def train_step_async(self) -> _Pending:
        """One optimizer step: forward and backward per micro batch (gradients accumulate and are synced on the
        last), clip, AdamW step at the scheduled learning rate. Its loss and norm stay on the device: nothing
        here waits for the GPU (`flush` reads them and refuses a non-finite one)."""
        import torch

        cfg, dist, step = self.cfg, self.dist, self.step
        t0 = time.time()
        b = self._batch(step)
        # rows with an objective: the global batch; else the scored tokens of every process, summed on the device
        scored = torch.tensor(float(cfg.batch_size if self.objective else b.scored), dtype=torch.float64,
                              device=dist.device)
        if dist.world > 1 and not self.objective:
            import torch.distributed

            torch.distributed.all_reduce(scored)
        scale = (dist.world / scored.clamp(min=1.0)).float()
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
                        total, ce = self._micro_loss(b.x[part], b.y[part], scale,
                                                     None if b.pos is None else b.pos[part], b.index[part])
                    total.backward()
                loss_sum += ce.detach().double()
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        except torch.OutOfMemoryError:
            raise TrainError(f"out of memory at step {step + 1}",
                             "lower train.micro_batch_size or data.seq_len, or set train.activation_checkpointing "
                             "= \"selective\" or \"full\"; resume with --resume") from None
        pending = _Pending(step, loss_sum, scored, norm, cfg.batch_size * b.x.shape[1], t0)
        if sync_interval(cfg, dist.device) == 1:  # reading now costs nothing: refuse a NaN before it is applied
            self._read([pending])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += pending.tokens
        return pending

    def _read(self, pending: list[_Pending]) -> list[StepStats]:
        """The steps' numbers on the host, in one device sync and one all-reduce; a non-finite loss or norm stops
        the run naming the first step that had it."""
        unread = [p for p in pending if p.stats is None]
        if unread:
            self._read_now(unread)
        self.loss = pending[-1].stats.loss
        return [p.stats for p in pending]

    def _read_now(self, pending: list[_Pending]) -> None:
        import torch

        sums = torch.stack([p.loss_sum for p in pending])
        if self.dist.world > 1:
            import torch.distributed

            torch.distributed.all_reduce(sums)
        scored = torch.stack([p.scored for p in pending]).clamp(min=1.0)
        norms = torch.stack([torch.as_tensor(p.norm, device=sums.device).double() for p in pending])
        losses, norms = _to_host(torch.stack([sums / scored, norms]))  # the one wait for the device
        for p, loss_val, norm in zip(pending, losses, norms):
            if not (math.isfinite(loss_val) and math.isfinite(norm)):
                raise TrainError(f"loss became {'NaN' if math.isnan(loss_val) else 'infinite'} at step {p.step + 1}"
                                 f"{f'; the last good checkpoint is {self.last_ckpt}' if self.last_ckpt else ''}",
                                 "lower train.lr or raise train.warmup_steps, then resume with --resume")
            p.stats = StepStats(loss_val, norm, p.tokens)

    def flush(self, stop: _StopFlag) -> bool:
        """Read the pending steps, measure validation when due, and report each step in order; True when every
        process is to stop now (see `report`)."""
        pending, self.pending = self.pending, []
        stats = self._read(pending)
        now = time.time()
        span = (now - pending[0].t0) / len(pending)  # the GPU ran ahead: time per step over the span
        verdicts = []
        for k, (p, st) in enumerate(zip(pending, stats)):
            metrics = self.step_metrics(st, p.step + 1, span, last=k == len(pending) - 1)
            metrics["val_loss"] = self.validation() if k == len(pending) - 1 else None
            verdicts.append(self.on_step(metrics) if self.dist.is_main else None)
        return self.report(verdicts, stop)

    def step_metrics(self, stats: StepStats, step: int, dt: float, last: bool = True) -> dict:
        """The report of `step` (speed from `dt`, its seconds, and ETA), the objective's own numbers averaged over
        processes on the last step of a read."""
        cfg = self.cfg
        elapsed = time.time() - self.t_start
        metrics = {"step": step, "loss": stats.loss, "lr": lr_at(step - 1, cfg), "grad_norm": stats.grad_norm,
                   "tokens": stats.tokens, "tokens_per_s": stats.tokens / dt if dt > 0 else 0.0, "elapsed": elapsed,
                   "eta": elapsed / max(step - self.start, 1) * (cfg.max_steps - step)}
        if hasattr(self.objective, "step_metrics") and last:
            metrics.update({k: (None if v is None else self.dist.sum(v) / self.dist.world)
                            for k, v in self.objective.step_metrics().items()})
        return metrics

    def validation_due(self) -> bool:
        cfg, step = self.cfg, self.step
        return bool(self.n_val and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps))

    def validation(self) -> float | None:
        """The validation loss when it is due (every cfg.eval_every steps and at the last), else None."""
        if not self.validation_due():
            return None
        return validate(self.model, self.rows, self.n_rows, self.n_val, self.cfg, self.dist, self.autocast,
                        self.objective, self.positions, self.chunked)

    def report(self, verdicts: list, stop: _StopFlag) -> bool:
        """True when every process is to stop now: asked to (Ctrl-C or SIGTERM here, or relayed by the launcher
        in its answer to a step report), or finishing early as done (early stopping: rank 0 decides for all)."""
        dist = self.dist
        if True in verdicts:
            stop.set = True  # the launcher relays a Ctrl-C
        self.finishing = dist.any("finish" in verdicts)
        return dist.any(stop.set) or self.finishing

    def checkpoint(self) -> None:
        """Checkpoint the current step (every process takes part, rank 0 writes and tells `on_checkpoint`);
        refused when the weights are no longer finite."""
        import torch

        at, dist = self.step, self.dist
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in local]).all() if local else True
        if dist.any(not bool(finite)):
            raise TrainError(f"the weights became non-finite at step {at}; not checkpointed"
                             f"{f' (the last good checkpoint is {self.last_ckpt})' if self.last_ckpt else ''}",
                             "lower train.lr or raise train.warmup_steps, then resume with --resume")
        self.settle()  # one checkpoint in flight at a time
        state = {**self.state, "loss": self.loss}
        if async_checkpoints(self.cfg, dist.device):
            self.saving = checkpoint.save_async(self.ckpt_dir, at, self.model, self.opt, state, dist.is_main,
                                                self.cfg.keep_checkpoints, self.ckpt_group)
            return
        path = checkpoint.save(self.ckpt_dir, at, self.model, self.opt, state, dist.is_main,
                               self.cfg.keep_checkpoints)
        self._saved(at, path)

    def settle(self) -> None:
        """Wait for the checkpoint being written in the background, if any, and tell `on_checkpoint`."""
        if self.saving is not None:
            saving, self.saving = self.saving, None
            self._saved(saving.step, saving.wait())

    def _saved(self, at: int, path) -> None:
        if self.dist.is_main:
            self.last_ckpt = str(path)
            self.on_checkpoint(at, self.last_ckpt)

    def result(self) -> FitResult:
        """Done when every step ran or early stopping finished the run; interrupted otherwise."""
        status = "done" if self.step >= self.cfg.max_steps or self.finishing else "interrupted"
        return FitResult(status, self.step, self.loss, self.tokens_seen, time.time() - self.t_start, self.last_ckpt,
                         self.model)

    def close(self) -> None:
        """The prefetch thread stopped; a checkpoint still being written (the run failed) finished or failed."""
        self.prefetch.close()
        if self.saving is not None:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                self.saving.wait()
            self.saving = None


def _to_host(t) -> list:
    """A tensor's values as Python numbers: the loop's one place that waits for the device."""
    return t.tolist()


def to_tensors(tok_np: np.ndarray, lab_np: np.ndarray, positions) -> tuple:
    """Rows as (tokens, labels, positions) tensors on the host, each (B, T); positions None without a rule."""
    import torch

    pos = None if positions is None else torch.from_numpy(positions(tok_np, lab_np))
    return torch.from_numpy(tok_np.astype(np.int64)), torch.from_numpy(lab_np.astype(np.int64)), pos


def to_device(tok_np: np.ndarray, lab_np: np.ndarray, positions, device: str):
    """Rows as (tokens, labels, positions) tensors on `device`, each (B, T); positions None without a rule."""
    return tuple(None if t is None else t.to(device) for t in to_tensors(tok_np, lab_np, positions))


def next_token_loss(model, x, pos, target, chunked: bool, **kw) -> tuple:
    """(the model's output, its summed next-token loss against `target` (B, T), already shifted): through the
    chunked head (`loss.head_loss`, the logits never built whole) or from the whole logits."""
    import torch.nn.functional as F

    if chunked:  # the head returns the summed loss, its logits built a chunk at a time
        with loss.head_loss(model, target):
            out = model(input_ids=x, position_ids=pos, use_cache=False, **kw)
        return out, out.logits
    out = model(input_ids=x, position_ids=pos, use_cache=False, **kw)
    logits = out.logits.float()  # (b, T, vocab); a no-op in fp32, no copy
    return out, F.cross_entropy(logits.view(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")


def validate(model, rows, n_rows: int, n_val: int, cfg: TrainConfig, dist: Dist, autocast, objective=None,
             positions=None, chunked: bool = False) -> float:
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
                if hasattr(objective, "set_rows"):
                    objective.set_rows(index[s:s + cfg.micro_batch_size])
                with autocast():
                    per_pair = getattr(objective, "val_losses", objective.losses)(model, x, y)
                total += float(per_pair[keep].sum())
                scored += int(keep.sum())
                continue
            target = F.pad(y[:, 1:], (0, 1), value=IGNORE)
            target[~keep] = IGNORE
            with autocast():
                _, ce = next_token_loss(model, x, pos, target, chunked)
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
