"""Training recipes: typed dataclasses loaded from small commented TOML files, overridable from the CLI.

A recipe is `stage` + `name` + sections `[model]`, `[data]`, `[train]`, `[lora]`. Loading checks every key
and value and reports all problems at once, each naming its TOML key (which is also its CLI flag:
`--train.lr 1e-4` or `--set train.lr=1e-4`).
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from appliance import refs
from appliance.errors import UsageError

RECIPES_DIR = refs.RECIPES_DIR  # shipped recipes (`appliance.refs` finds them)
STAGES = ("pretrain", "continue", "sft", "dpo", "grpo")
ADAPTER_STAGES = ("sft", "dpo", "grpo")  # stages that may train LoRA/QLoRA adapters instead of every weight
METHODS = ("full", "lora", "qlora")


@dataclass
class ModelConfig:
    """Model shape for `pretrain`; `base` for `continue`, `sft` and `dpo`."""

    arch: str = "dense"
    """dense (Llama-style) or moe (Mixtral-style mixture of experts)."""
    hidden_size: int = 64
    """Width of the residual stream; real presets use multiples of 256 so k-quants apply."""
    intermediate_size: int = 256
    """MLP width (per expert for moe); real presets use multiples of 256."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads; hidden_size / num_heads is the head size."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    max_seq_len: int = 2048
    """Longest context the model supports (rotary positions)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    tie_embeddings: bool = False
    """Share the input embedding and output head (small models)."""
    num_experts: int = 8
    """moe: experts per layer."""
    experts_per_token: int = 2
    """moe: experts each token is routed to."""
    router_aux_loss: float = 0.02
    """moe: weight of the load-balancing loss."""
    base: str = ""
    """continue/sft/dpo/grpo: model id (NAME@K) from `appliance train import` or an earlier run."""

    def problems(self, stage: str) -> list[str]:
        p = []
        if stage != "pretrain":
            if not self.base:
                p.append(f"model.base is required for stage {stage!r} (a model id, e.g. pilot@1)")
            return p
        if self.base:
            p.append("model.base is only for stages continue, sft, dpo and grpo; pretrain starts from random weights")
        if self.arch not in ("dense", "moe"):
            p.append(f"model.arch must be 'dense' or 'moe', not {self.arch!r}")
        for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            if getattr(self, k) < 1:
                p.append(f"model.{k} must be at least 1")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            p.append(f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads ({self.num_heads})")
        elif self.num_heads >= 1 and (self.hidden_size // self.num_heads) % 2:
            p.append("model.hidden_size / model.num_heads must be even (rotary embeddings)")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            p.append(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                     f"({self.num_kv_heads})")
        if self.rope_theta <= 0:
            p.append("model.rope_theta must be positive")
        if self.arch == "moe":
            if self.num_experts < 2:
                p.append("model.num_experts must be at least 2 for arch 'moe'")
            if not 1 <= self.experts_per_token <= max(self.num_experts, 1):
                p.append("model.experts_per_token must be between 1 and model.num_experts")
            if self.router_aux_loss < 0:
                p.append("model.router_aux_loss must be >= 0")
        return p


@dataclass
class DataConfig:
    """What to train on: vault dataset versions, tokenized and packed in memory or in the vault."""

    datasets: list[str] = field(default_factory=list)
    """Dataset versions (NAME@N, or NAME for the newest) whose train split is used."""
    tokenizer: str = ""
    """pretrain: tokenizer id from `appliance train tokenizer`; continue/sft use the base model's."""
    seq_len: int = 512
    """Tokens per packed sequence."""
    format: str = "text"
    """text: records as documents separated by EOS; chat: prompt/response pairs from a table (SFT);
    preference: prompt/chosen/rejected triples from a table (DPO); prompts: prompts (and, if the table has
    data.response_field, reference answers for the rewards) from a table (GRPO); task: the episodes of
    data.task (GRPO; the reward is whether the episode succeeded)."""
    task: str = ""
    """task: an agentic task (a shipped task's name or a task TOML file) whose episodes are the prompts."""
    prompt_field: str = "instruction"
    """chat, preference: the column holding the user's turn."""
    response_field: str = "response"
    """chat: the column holding the assistant's answer (the only tokens the loss sees); prompts: the
    reference answer the rewards compare with (optional)."""
    chosen_field: str = "chosen"
    """preference: the column holding the answer to prefer."""
    rejected_field: str = "rejected"
    """preference: the column holding the answer to move away from."""
    system_prompt: str = ""
    """chat, preference: optional system turn put before every conversation."""
    tables: str = "text"
    """text: how table rows (an ingested CSV/JSONL/Parquet) enter pre-training: "text" as "column: value"
    lines, without the record's "[table row N]" header; "skip" leaves them out (the run's data says which)."""
    cross_document: bool = False
    """text: let a document attend to those packed before it in a row (one causal span per row, positions
    straight through); false (the default) restarts positions at each document and masks across them. Chat,
    preference and prompts rows never attend across conversations."""

    def problems(self, stage: str) -> list[str]:
        p = []
        if self.format == "task":
            if self.datasets:
                p.append("data.datasets is not used by data.format 'task': the task's episodes are the prompts")
            if self.system_prompt:
                p.append("data.system_prompt is not used with data.format 'task': episodes are played (and "
                         "evaluated) as the user's turn alone")
            if not self.task:
                p.append("data.task is required by data.format 'task' (a shipped task name or a task TOML file)")
            else:
                from appliance.errors import UsageError
                from appliance.tasks import load

                try:
                    t = load(self.task)
                    if not t.indexes("train"):
                        p.append(f"data.task {self.task} has no train episodes")
                except UsageError as e:
                    p.append(f"data.task: {e.message}")
        elif not self.datasets:
            p.append("data.datasets must name at least one dataset version, e.g. [\"handbook@2\"]")
        if self.task and self.format != "task":
            p.append("data.task goes with data.format 'task'")
        if stage == "pretrain" and not self.tokenizer:
            p.append("data.tokenizer is required for pretrain (train one with `appliance train tokenizer`)")
        if stage != "pretrain" and self.tokenizer:
            p.append(f"data.tokenizer is not used by stage {stage!r}: the base model's tokenizer is")
        if self.seq_len < 8:
            p.append("data.seq_len must be at least 8")
        if self.cross_document and self.format != "text":
            p.append("data.cross_document is for data.format 'text' (pre-training); conversations never attend "
                     "to each other")
        if self.tables not in ("text", "skip"):
            p.append(f"data.tables must be text or skip, not {self.tables!r}")
        if self.format not in ("text", "chat", "preference", "prompts", "task"):
            p.append(f"data.format must be text, chat, preference, prompts or task, not {self.format!r}")
        if stage == "sft" and self.format != "chat":
            p.append("data.format must be 'chat' for stage 'sft'")
        if (stage == "dpo") != (self.format == "preference"):
            p.append("data.format 'preference' goes with stage 'dpo', and only with it")
        if (stage == "grpo") != (self.format in ("prompts", "task")):
            p.append("data.format 'prompts' or 'task' goes with stage 'grpo', and only with them")
        if self.format == "preference" and len({self.prompt_field, self.chosen_field, self.rejected_field}) < 3:
            p.append("data.prompt_field, data.chosen_field and data.rejected_field must be three different columns")
        return p


@dataclass
class TrainConfig:
    """The shared loop: AdamW, warmup + cosine, accumulation, clipping, checkpoints."""

    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per optimizer step, across all processes (the global batch)."""
    micro_batch_size: int = 4
    """Sequences per forward pass on one process; the rest is gradient accumulation."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (matrices only; not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    seed: int = 1234
    """Seeds weight init and the data order."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every N steps (and at the end or on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are removed."""
    checkpoint_async: str = "auto"
    """Write checkpoints behind the training: "on", "off", or "auto" (on a GPU: the state is copied to host
    memory, the next steps run while a thread seals and writes it)."""
    activation_checkpointing: bool | str = False
    """Recompute activations in the backward pass: "full" (or true) every decoder layer, least memory, about
    30% more compute; "selective" every other layer, about half of both; "none" (or false). Shipped recipes use
    the least that fits the box (appliance/train/memory.py)."""
    compile: str = "auto"
    """torch.compile each decoder layer: "on", "off", or "auto" (on a GPU only: compiling costs a minute at
    start and pays back over a long run, not in a CPU test)."""
    sync_every: int = 0
    """Read the loss and gradient norm to the host every N steps (0: auto, 10 on a GPU, 1 on a CPU), so a GPU
    never waits for the host each step; every step is still reported, N at a time. A NaN, Ctrl-C or early
    stopping is acted on at the next read (and always before a checkpoint)."""
    precision: str = "auto"
    """auto (bf16 on GPU: FSDP2's mixed-precision policy or autocast; fp32 on CPU), bf16 or fp32."""
    parallel: str = "auto"
    """With --gpus > 1: ddp (replicate), fsdp (shard parameters, gradients and optimizer state with FSDP2), or
    auto: ddp when the memory estimate fits one GPU (train.gpu_memory_gb), else fsdp (full training only)."""
    gpu_memory_gb: float = 141.0
    """Memory of one GPU of the box, in GB (1e9 bytes), for the memory estimate behind train.parallel = auto."""
    eval_every: int = 0
    """Measure the loss on the datasets' validation split every N steps and at the end (0: never)."""
    early_stop_patience: int = 0
    """Finish early when the validation loss has not improved for this many measurements (0: never)."""
    dpo_beta: float = 0.1
    """dpo: strength of the pull back to the reference model (higher: stay closer to it)."""

    def problems(self) -> list[str]:
        p = []
        for k in ("max_steps", "batch_size", "micro_batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, k) < 1:
                p.append(f"train.{k} must be at least 1")
        if self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size:
            p.append(f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                     f"({self.micro_batch_size})")
        if not self.lr > 0:
            p.append("train.lr must be positive")
        if not 0 <= self.min_lr <= self.lr:
            p.append("train.min_lr must be between 0 and train.lr")
        if not 0 <= self.warmup_steps < max(self.max_steps, 1):
            p.append("train.warmup_steps must be >= 0 and less than train.max_steps")
        if self.weight_decay < 0:
            p.append("train.weight_decay must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            p.append("train.beta1 and train.beta2 must be in [0, 1)")
        if self.seed < 0:
            p.append("train.seed must be >= 0")
        if self.grad_clip < 0:
            p.append("train.grad_clip must be >= 0 (0 turns clipping off)")
        if self.precision not in ("auto", "bf16", "fp32"):
            p.append(f"train.precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.eval_every < 0 or self.early_stop_patience < 0:
            p.append("train.eval_every and train.early_stop_patience must be >= 0")
        if self.early_stop_patience and not self.eval_every:
            p.append("train.early_stop_patience needs train.eval_every (the validation loss it watches)")
        if checkpointing_mode(self.activation_checkpointing) is None:
            p.append("train.activation_checkpointing must be full, selective or none (true and false: full and "
                     f"none), not {self.activation_checkpointing!r}")
        if self.checkpoint_async not in ("auto", "on", "off"):
            p.append(f"train.checkpoint_async must be auto, on or off, not {self.checkpoint_async!r}")
        if self.compile not in ("auto", "on", "off"):
            p.append(f"train.compile must be auto, on or off, not {self.compile!r}")
        if self.sync_every < 0:
            p.append("train.sync_every must be >= 0 (0: auto)")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            p.append(f"train.parallel must be 'auto', 'ddp' or 'fsdp', not {self.parallel!r}")
        if not self.gpu_memory_gb > 0:
            p.append("train.gpu_memory_gb must be positive")
        if not self.dpo_beta > 0:
            p.append("train.dpo_beta must be positive")
        return p


def checkpointing_mode(value) -> str | None:
    """train.activation_checkpointing as one of full | selective | none (None when it is none of them)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return value if value in ("full", "selective", "none") else None


@dataclass
class LoraConfig:
    """Adapter settings for `method = "lora"` and `"qlora"`."""

    rank: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=list)
    """Linear layers that get adapters; empty: chosen by the base's architecture (q/k/v/o and gate/up/down
    projections; Phi-3's fused qkv_proj and gate_up_proj), recorded in the run's lineage."""
    merge: bool = False
    """Also save the base with the adapter merged in (a plain model directory)."""

    def problems(self) -> list[str]:
        p = []
        if self.rank < 1:
            p.append("lora.rank must be at least 1")
        if self.alpha <= 0:
            p.append("lora.alpha must be positive")
        if not 0 <= self.dropout < 1:
            p.append("lora.dropout must be in [0, 1)")
        return p


@dataclass
class GrpoConfig:
    """Reinforcement tuning (`stage = "grpo"`): sampled answers scored by reward functions."""

    rewards: list[str] = field(default_factory=lambda: ["overlap"])
    """Reward functions, averaged: exact, overlap, regex, json_schema, tool_call, or a plugin's name
    (modules in APPLIANCE_REWARD_PLUGINS register them)."""
    group_size: int = 4
    """Answers sampled per prompt; each is judged against its group's mean reward."""
    max_new_tokens: int = 32
    """Longest sampled answer."""
    temperature: float = 1.0
    """Sampling temperature."""
    kl_beta: float = 0.04
    """Weight of the KL penalty that keeps the policy near the reference (the base)."""
    pattern: str = ""
    """regex: the pattern an answer must contain (Python syntax)."""
    schema: str = ""
    """json_schema: the JSON Schema (inline JSON) an answer must be a valid instance of."""
    tools: list[str] = field(default_factory=list)
    """tool_call: names of the tools an answer may call (empty: any name)."""

    def problems(self) -> list[str]:
        import json
        import re

        from appliance.train.rewards import BUILTIN, known

        p = []
        if not self.rewards:
            p.append("grpo.rewards must name at least one reward")
        unknown = [r for r in self.rewards if r not in known()]
        if unknown:
            p.append(f"grpo.rewards: unknown {', '.join(unknown)} (built in: {', '.join(BUILTIN)}; plugins come from "
                     "APPLIANCE_REWARD_PLUGINS)")
        if self.group_size < 2:
            p.append("grpo.group_size must be at least 2 (answers are judged against their group)")
        if self.max_new_tokens < 1:
            p.append("grpo.max_new_tokens must be at least 1")
        if not self.temperature > 0:
            p.append("grpo.temperature must be positive")
        if self.kl_beta < 0:
            p.append("grpo.kl_beta must be >= 0")
        if "regex" in self.rewards:
            try:
                re.compile(self.pattern or "")
            except re.error as e:
                p.append(f"grpo.pattern is not a valid regex: {e}")
            if not self.pattern:
                p.append("grpo.pattern is required by the regex reward")
        if "json_schema" in self.rewards:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(json.loads(self.schema))
            except ValueError:
                p.append("grpo.schema must be a JSON Schema written as JSON (required by the json_schema reward)")
            except jsonschema.SchemaError as e:
                p.append(f"grpo.schema is not a valid JSON Schema: {e.message}")
        return p


@dataclass
class Recipe:
    """A whole training run."""

    stage: str = "pretrain"
    """pretrain (random init), continue (more pre-training of a base model), sft (chat fine-tuning), dpo
    (preference tuning: toward chosen answers, away from rejected ones, anchored to the base) or grpo
    (reinforcement tuning: toward sampled answers that score above their group's mean reward)."""
    name: str = ""
    """Model name; each run saves NAME@K."""
    method: str = "full"
    """sft, dpo, grpo: full, lora or qlora (4-bit NF4 base + LoRA)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    notes = ()  # not a field (never saved or compared): what loading adjusted, one line each, for the operator

    def problems(self) -> list[str]:
        p = []
        if self.stage not in STAGES:
            p.append(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if not self.name:
            p.append("name is required (the model is saved as NAME@K)")
        else:
            from appliance.vault.ingest import NAME_RE

            if not NAME_RE.match(self.name):  # it becomes directory names under the home
                p.append(f"name {self.name!r} must be lowercase letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
        if self.method not in METHODS:
            p.append(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        elif self.method != "full" and self.stage not in ADAPTER_STAGES:
            p.append(f"method {self.method!r} is for stages sft, dpo and grpo; stage {self.stage!r} trains every "
                     "weight")
        if self.method != "full" and self.train.parallel == "fsdp":
            p.append("train.parallel 'fsdp' is for full training; adapters are small, use 'ddp'")
        if self.data.format == "task" and self.train.parallel == "fsdp":
            p.append("train.parallel 'fsdp' is not available for data.format 'task' (episodes play a different "
                     "number of turns on each process, and FSDP needs the same forward passes on all); use 'ddp'")
        if self.stage == "grpo":
            p += self.grpo.problems()
        p += self.model.problems(self.stage)
        p += self.data.problems(self.stage)
        p += self.train.problems()
        if self.method != "full":
            p += self.lora.problems()
        if self.stage == "pretrain" and self.data.seq_len > self.model.max_seq_len:
            p.append(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        return p

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig,
            "grpo": GrpoConfig}


def shipped() -> dict[str, Path]:
    """Recipes that ship with the appliance, by name."""
    return refs.shipped(RECIPES_DIR)


def recipe_purpose(path: Path) -> str:
    """The recipe's `# purpose:` comment: what it is for and roughly how many steps make a model say something."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# purpose:"):
            return line.removeprefix("# purpose:").strip()
    return ""


def find_recipe(ref: str) -> Path:
    """A path to a TOML file, or the name of a shipped recipe: `appliance.refs.recipe`."""
    return refs.recipe(ref)


def load_recipe(ref: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe, apply `KEY=VALUE` overrides, check it; every problem is reported at once."""
    path = find_recipe(ref)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe {path} is not valid TOML: {e}", "fix the file and run again") from None
    return build_recipe(raw, overrides, f"recipe {path.name}")


def build_recipe(raw: dict, overrides: list[str] | None = None, label: str = "the recipe") -> Recipe:
    """A checked Recipe from its TOML tables (as read, or as `Recipe.to_dict` wrote them)."""
    problems: list[str] = []
    recipe_steps = raw.get("train", {}).get("max_steps", TrainConfig.max_steps) if isinstance(
        raw.get("train"), dict) else TrainConfig.max_steps
    given = set()
    for item in overrides or []:
        key = item.partition("=")[0].strip().lstrip("-")
        if key in given and not _is_list_key(key):
            problems.append(f"{key} is given more than once; give it once")
        _apply_override(raw, item, problems, extend=key in given and _is_list_key(key))
        given.add(key)
    recipe = from_dict(raw, problems)
    if "train.max_steps" in given and "train.warmup_steps" not in given:
        recipe.notes = _fit_warmup(recipe.train, recipe_steps)
    if recipe.data.task and Path(recipe.data.task).is_file():  # a job runs elsewhere: a file is named absolutely
        recipe.data.task = str(Path(recipe.data.task).resolve())
    problems += recipe.problems()
    if problems:
        n = len(problems)
        raise UsageError(f"{label} has {n} problem{'s' * (n > 1)}: " + "; ".join(problems),
                         "fix the recipe or override with --KEY VALUE")
    return recipe


def _fit_warmup(t: TrainConfig, recipe_steps) -> tuple[str, ...]:
    """A run shortened with --train.max_steps keeps the recipe's share of warmup rather than being refused."""
    steps, warmup = t.max_steps, t.warmup_steps
    if not (isinstance(steps, int) and isinstance(warmup, int) and steps >= 1 and warmup >= steps):
        return ()
    share = warmup / recipe_steps if isinstance(recipe_steps, int) and recipe_steps > 0 else 0.1
    t.warmup_steps = min(round(share * steps), steps - 1)
    return (f"train.warmup_steps {warmup} -> {t.warmup_steps}: scaled to the shortened run of {steps} steps "
            f"(give --train.warmup_steps to choose)",)


def from_dict(raw: dict, problems: list[str]) -> Recipe:
    top = {}
    sections = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{key} must be a table ([{key}])")
                continue
            sections[key] = _build(SECTIONS[key], value, key + ".", problems)
        else:
            top[key] = value
    recipe = _build(Recipe, top, "", problems, skip=set(SECTIONS))
    for key, value in sections.items():
        setattr(recipe, key, value)
    return recipe


def _build(cls, values: dict, prefix: str, problems: list[str], skip: set[str] = frozenset()):
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + list(skip), n=1)
            problems.append(f"unknown key {prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        ok, value = _coerce(hints[key], value)
        if not ok:
            shown = value.text if isinstance(value, _Override) else value
            problems.append(f"{prefix}{key} must be {_type_name(hints[key])}, not {shown!r}")
            continue
        kwargs[key] = value
    obj = cls(**{k: v for k, v in kwargs.items()})
    return obj


@dataclass
class _Override:
    """A command-line value: its TOML reading, and the raw text for string keys (`--name nan` is a name)."""

    text: str
    value: Any


def _coerce(hint, value) -> tuple[bool, Any]:
    if isinstance(value, _Override):
        value = value.value if (hint is not str or isinstance(value.value, str)) else value.text
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint == list[str]:
        if isinstance(value, str):  # a CLI override may give one name or a comma list
            value = [v.strip() for v in value.split(",") if v.strip()]
        return isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return True, value


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a list of strings")


def _is_list_key(key: str) -> bool:
    """Keys that hold a list (data.datasets, lora.target_modules, ...): a repeated --KEY adds to them."""
    section, _, name = key.rpartition(".")
    cls = SECTIONS.get(section) if section else Recipe
    return cls is not None and get_type_hints(cls).get(name) == list[str]


def _apply_override(raw: dict, item: str, problems: list[str], extend: bool = False) -> None:
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        problems.append(f"override {item!r} must be KEY=VALUE, e.g. train.lr=1e-4")
        return
    parts = key.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS):
        problems.append(f"override key {key!r} must be a top-level key or SECTION.KEY with SECTION one of "
                        + ", ".join(SECTIONS))
        return
    try:  # a TOML literal (numbers, booleans, quoted strings, arrays); anything else is a bare string
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    target = raw
    if len(parts) == 2:
        target = raw.setdefault(parts[0], {})
        if not isinstance(target, dict):
            problems.append(f"{parts[0]} must be a table ([{parts[0]}])")
            return
    old = target.get(parts[-1])
    if extend and isinstance(old, _Override):  # --data.datasets a@1 --data.datasets b@2: both
        text, value = f"{old.text},{text}", _as_list(old.value) + _as_list(value)
    target[parts[-1]] = _Override(text, value)


def _as_list(value) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, list) else [value]


def describe() -> list[dict]:
    """Every recipe key with its default and docstring (for `appliance train recipes --keys`)."""
    out = []
    for prefix, cls in [("", Recipe), *((k + ".", c) for k, c in SECTIONS.items())]:
        docs = _field_docs(cls)
        for f in fields(cls):
            if f.name in SECTIONS:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            out.append({"key": prefix + f.name, "default": default, "help": docs.get(f.name, "")})
    return out


def _field_docs(cls) -> dict[str, str]:
    """Field docstrings (the string literal after each field) read from the source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs
