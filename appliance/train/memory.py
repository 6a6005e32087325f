"""Memory per GPU of a recipe, estimated from the model's shape, and the parallel mode that fits the box.

The box is `train.gpus_per_box` GPUs of `train.gpu_memory_gb` (default 8 x 141 GB, an H200 box); a recipe fits
a mode when its estimate stays under 0.85 of one GPU's memory (the rest: allocator fragmentation, kernels'
workspaces, NCCL buffers). `train.parallel = "auto"` (the default) picks DDP when it fits (no gathers, the
fastest), else FSDP2. The model is counted from its transformers config built on the meta device, so the
numbers match the model that would run, with no memory allocated.

Bytes per GPU (P: trained parameters, F: frozen ones, N: world size), with bf16 compute on the GPU:
- state: fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 P (FSDP: 16 P / N);
- DDP: + 4 P of gradient buckets + 2 P of bf16 weight copies autocast keeps through the forward;
- FSDP: + the unsharded bf16 weights of two decoder layers (one computing, one prefetched) and the fp32
  gradients of the one being reduced (8 bytes a layer parameter), and the root (embeddings, head, final
  norm) unsharded through the step (6 bytes a parameter);
- frozen weights (LoRA base, DPO/GRPO reference): 2 F (bf16), 0.56 F for a 4-bit QLoRA base, never sharded;
  GRPO's merged bf16 copy for sampling (2 bytes a parameter; not under FSDP2, which samples through the shards);
- activations of one micro batch: per token and layer 2 (5h + 2kv + 4i) bytes in bf16 plus 8h of fp32
  residual and norm inputs (i: the MLP width times experts per token); a checkpointed layer keeps only its
  4h-byte input, plus one layer in full for the recompute ("full": every layer, "selective": every other);
- logits: the loss runs the output head over CHUNK tokens at a time (`loss.chunked_cross_entropy`), so
  14 bytes per vocabulary entry for at most CHUNK tokens (bf16 logits, their fp32 copy, its gradient, the
  log-softmax), and the bf16 hidden states it recomputes them from;
- 2 GB for the CUDA context and kernels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from appliance.train.config import checkpointing_mode

HEADROOM = 0.85
CHUNK = 4096  # tokens per piece of the chunked cross-entropy (`loss.CHUNK`)
GB = 1e9
CONTEXT = 2 * GB
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    """What the estimate needs of a model, read from its config and its parameters on the meta device."""

    params: int
    hidden: int
    layers: int
    kv_dim: int
    mlp_per_token: int  # intermediate size x experts each token visits
    vocab: int
    layer_params: int  # the largest decoder layer
    root_params: int  # everything outside the decoder layers
    lora_params: int  # adapters of `lora.rank` on the LoRA targets


def meta_model(config):
    """The transformers model of `config` on the meta device: shapes only, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def shape_of(model, lora_rank: int = 8, lora_targets: tuple[str, ...] | list[str] = ()) -> Shape:
    """The `Shape` of a model (built on the meta device, or real)."""
    import torch

    cfg = model.config
    layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    total = sum(p.numel() for p in model.parameters())
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    root = total - sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) * head
    per_token = cfg.intermediate_size * (getattr(cfg, "num_experts_per_tok", None) or 1)
    targets = set(lora_targets or DEFAULT_LORA_TARGETS)
    lora = sum(lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return Shape(total, cfg.hidden_size, cfg.num_hidden_layers, kv, per_token, cfg.vocab_size, layer_params, root,
                 lora)


@dataclass
class Estimate:
    """Bytes per GPU of one mode, by part, and whether it fits."""

    mode: str
    state: float
    """Trained weights, gradients, optimizer state (sharded under FSDP)."""
    working: float
    """DDP buckets and autocast copies, or FSDP's unsharded layers."""
    frozen: float
    """Frozen weights: LoRA base, reference model."""
    activations: float
    logits: float
    total: float
    budget: float
    """HEADROOM x one GPU's memory."""

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def gb(self) -> dict:
        """The figures in GB (1e9 bytes), rounded, for a line or a JSON report."""
        return {k: (round(v / GB, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()} | {
            "fits": self.fits}


def tokens_per_micro_batch(recipe) -> tuple[int, int]:
    """(sequences, tokens each) of one forward on one GPU for the recipe's stage."""
    mb, seq = recipe.train.micro_batch_size, recipe.data.seq_len
    if recipe.stage == "dpo":  # a row is [chosen | rejected]: two sequences
        return 2 * mb, seq
    if recipe.stage == "grpo":  # group_size answers per prompt, each prompt + answer long
        return mb * recipe.grpo.group_size, seq + recipe.grpo.max_new_tokens
    return mb, seq


def estimate(shape: Shape, recipe, mode: str, world: int) -> Estimate:
    """Memory per GPU of `recipe` on a model of `shape` in `mode` (ddp | fsdp) over `world` GPUs."""
    method = recipe.method
    trained = shape.params if method == "full" else shape.lora_params
    frozen = 0.0 if method == "full" else shape.params * (0.56 if method == "qlora" else 2.0)
    if method == "full" and recipe.stage in ("dpo", "grpo"):
        frozen += 2.0 * shape.params  # the reference model, bf16, whole on each GPU
    sharded = mode == "fsdp" and world > 1
    if recipe.stage == "grpo" and not sharded:
        frozen += 2.0 * shape.params  # the merged bf16 copy answers are sampled from (`grpo.Generator`)
    state = 16.0 * trained / (world if sharded else 1)
    if sharded:
        working = 8.0 * shape.layer_params + 6.0 * shape.root_params
    else:
        working = 6.0 * trained  # gradient buckets (4) + bf16 copies under autocast (2)
    seqs, length = tokens_per_micro_batch(recipe)
    tokens = seqs * length
    h = shape.hidden
    per_layer = 2.0 * (5 * h + 2 * shape.kv_dim + 4 * shape.mlp_per_token) + 8 * h  # bytes per token
    acts = activations(tokens, h, per_layer, shape.layers, checkpointing_mode(recipe.train.activation_checkpointing))
    logits = 14.0 * min(tokens, CHUNK) * shape.vocab + 2.0 * tokens * h
    if recipe.stage in ("dpo", "grpo"):  # their log-probabilities still come from whole logits (fp32 + grads)
        logits = 14.0 * tokens * shape.vocab
    total = state + working + frozen + acts + logits + CONTEXT
    return Estimate(mode, state, working, frozen, acts, logits, total, HEADROOM * recipe.train.gpu_memory_gb * GB)


def activations(tokens: int, h: int, per_layer: float, layers: int, mode: str) -> float:
    """Bytes of one micro batch's activations with activation checkpointing `mode` (full | selective | none)."""
    kept = {"full": layers, "selective": (layers + 1) // 2, "none": 0}[mode]  # layers that keep only their input
    return tokens * ((layers - kept) * per_layer + kept * 4.0 * h + (per_layer if kept else 0.0))


def least_checkpointing(shape: Shape, recipe, mode: str, world: int) -> str:
    """The lightest activation checkpointing (none, then selective, then full) under which `recipe` fits in `mode`:
    recomputing costs time, so a recipe that fits without it should not use it."""
    import copy

    trial = copy.deepcopy(recipe)
    for ac in ("none", "selective", "full"):
        trial.train.activation_checkpointing = ac
        if estimate(shape, trial, mode, world).fits:
            return ac
    return "full"


def choose(shape: Shape, recipe, world: int) -> tuple[str, Estimate]:
    """The parallel mode for `recipe` on `world` GPUs: the recipe's own, or with "auto" DDP when it fits, else
    FSDP2 (adapters always DDP: their trained state is small and FSDP2 is for full training)."""
    wanted = recipe.train.parallel
    if wanted == "auto":
        ddp = estimate(shape, recipe, "ddp", world)
        if ddp.fits or recipe.method != "full" or recipe.data.format == "task" or world == 1:
            return "ddp", ddp
        return "fsdp", estimate(shape, recipe, "fsdp", world)
    return wanted, estimate(shape, recipe, wanted, world)
