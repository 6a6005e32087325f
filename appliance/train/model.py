"""Models: presets to transformers configs, local base models, LoRA/QLoRA wiring, saving, import.

Every model is a plain transformers directory (config.json + model.safetensors + tokenizer) that
`AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` loads with no custom code. Nothing here
ever reaches a hub: every load passes `local_files_only=True` and a local path.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance import sealed
from appliance.errors import ApplianceError, UsageError
from appliance.home import atomic_dir, file_sha256
from appliance.memfiles import MemFile
from appliance.train.config import LoraConfig, ModelConfig


class TrainError(ApplianceError):
    """A training run could not start or had to stop."""


def quiet() -> None:
    """transformers' own progress bars and advice would mix with ours on the operator's terminal."""
    import logging
    import warnings

    # bitsandbytes comes in with peft on every LoRA run (peft.helpers imports it), and on a CPU with AVX512-BF16
    # its CPU backend looks for a hub kernel and logs "Failed to load ... from kernels-community ... `pip install
    # kernels`". That kernel serves 4-bit matmuls only; without the `kernels` package nothing is fetched, and
    # with it the hub lookup obeys HF_HUB_OFFLINE (set by the CLI). Must run before bitsandbytes is imported.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@contextmanager
def bitsandbytes_hidden(needed: bool = False) -> Iterator[None]:
    """Within the block, peft and transformers see no bitsandbytes, unless a 4-bit (QLoRA) model needs it.

    peft imports bitsandbytes whenever it is installed (peft.helpers on import, the LoRA layer dispatch when it
    adapts a model), and bitsandbytes loads torch's compiler stack: about 1.5 s of every LoRA process (each
    torchrun rank, each job) for what only QLoRA uses. After the block the answers peft and transformers
    cached about it are forgotten, so a QLoRA model later in the same process imports it and works as usual.
    """
    if needed or "bitsandbytes" in sys.modules:
        yield
        return
    _forget_bitsandbytes()
    sys.modules["bitsandbytes"] = None  # an import of it fails; find_spec says it is not installed
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        _forget_bitsandbytes()


def _forget_bitsandbytes() -> None:
    for module, probes in (("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
                           ("transformers.utils.import_utils", ("is_bitsandbytes_available",))):
        if m := sys.modules.get(module):
            for probe in probes:
                getattr(m, probe).cache_clear()


def hf_config(m: ModelConfig, tokenizer):
    """The transformers config for a preset, sized to `tokenizer`'s vocabulary (rounded up to 64)."""
    from transformers import LlamaConfig, MixtralConfig

    vocab = -(-len(tokenizer) // 64) * 64  # padded so the output matmul tiles well
    common = dict(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                  num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len,
                  rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  tie_word_embeddings=m.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if m.arch == "moe":
        return MixtralConfig(num_local_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                             router_aux_loss_coef=m.router_aux_loss, output_router_logits=False, **common)
    return LlamaConfig(**common)


def new_model(m: ModelConfig, tokenizer, seed: int, attention: str = "sdpa"):
    """Random init from a preset (fp32); the same seed gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(m, tokenizer), dtype=torch.float32,
                                            attn_implementation=attention)


def count_parameters(m: ModelConfig, vocab_size: int = 32000) -> dict:
    """Total and active (per token) parameters of a preset, counted from its shape: no torch, no memory.

    Mirrors what `hf_config` builds (Llama / Mixtral, no biases; the vocabulary padded to 64), which a test
    checks against the model built on the meta device. (Building it here cost ~5 s of torch import.)
    """
    vocab = -(-vocab_size // 64) * 64
    head = m.hidden_size // max(m.num_heads, 1)
    attn = 2 * m.hidden_size * m.hidden_size + 2 * m.hidden_size * m.num_kv_heads * head  # q, o; k, v
    mlp = 3 * m.hidden_size * m.intermediate_size  # gate, up, down
    experts = m.num_experts if m.arch == "moe" else 1
    router = m.hidden_size * m.num_experts if m.arch == "moe" else 0
    layer = attn + experts * mlp + router + 2 * m.hidden_size  # two RMSNorms
    embed = vocab * m.hidden_size * (1 if m.tie_embeddings else 2)
    total = embed + m.num_layers * layer + m.hidden_size  # the final norm
    active = total
    if m.arch == "moe":
        expert = m.num_layers * experts * mlp
        active = total - expert + expert * m.experts_per_token // m.num_experts
    return {"total": total, "active": active}


def tokenizer_vocab(home, ref: str, default: int = 32000) -> tuple[str | None, int]:
    """(tokenizer id, vocabulary size) of `ref` (NAME@K, or NAME for the newest) in `home`'s artifacts, read
    from its tokenizer.json without the vault; (None, `default`) when the home has no such tokenizer."""
    from appliance.refs import pick

    root = Path(home.artifacts) / "tokenizers"
    try:
        found = pick(ref, [p.name for p in root.iterdir() if p.is_dir()]) if ref else None  # the rule of refs
        if found is None:
            return None, default
        best = root / found
        doc = json.loads(sealed.read_bytes(best / "tokenizer.json"))
    except (OSError, ValueError, sealed.SealedError):
        return None, default
    ids = [*doc.get("model", {}).get("vocab", {}).values(), *(t["id"] for t in doc.get("added_tokens", []))]
    return (best.name, max(ids) + 1) if ids else (None, default)


def load_tokenizer(path: Path, chat: bool = False):
    """The tokenizer at `path`; with `chat`, one without a chat template gets the appliance's ChatML
    (`bases.ensure_chat_template`), which is then saved with every model trained from it."""
    from transformers import AutoTokenizer

    with sealed.opened(path, weights=False) as p:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if chat:
        from appliance.train.bases import ensure_chat_template

        ensure_chat_template(tokenizer)
    return tokenizer


def load_base(path: Path, method: str = "full", lora: LoraConfig | None = None, device: str = "cpu",
              frozen_dtype: str = "float32", attention: str = "sdpa"):
    """A base model for `continue` / `sft`: full weights, or frozen (4-bit for qlora) with LoRA adapters.

    Trained weights load in fp32 (the optimizer's master copy); a LoRA base, frozen, in `frozen_dtype` (bf16 on
    a GPU: `precision.plan`), its adapters in fp32. `attention`: the transformers attention implementation.
    """
    import torch
    from transformers import AutoModelForCausalLM

    quiet()
    dtype = getattr(torch, frozen_dtype) if method == "lora" else torch.float32
    kwargs: dict = {"local_files_only": True, "dtype": dtype, "attn_implementation": attention}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
        kwargs["device_map"] = {"": device}
    kwargs["attn_implementation"] = supported_attention(path, attention)
    try:
        with sealed.opened(path) as p:
            model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
        model.name_or_path = model.config._name_or_path = str(path)  # not the in-memory directory, gone now
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the base model at {path}: {str(e).splitlines()[0]}",
                         "re-import it with `appliance train import`") from None
    if method == "full":
        return model
    with bitsandbytes_hidden(needed=method == "qlora"):
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        targets = lora_targets(model, lora)
        cfg = PeftLora(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                       bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)


def supported_attention(path: Path, attention: str) -> str:
    """`attention`, or "eager" where the architecture lacks it (Gemma 2 has no SDPA path: its logit soft-capping).
    Eager attention keeps packed documents apart the same way: transformers builds its mask from the position
    ids that restart per document."""
    import json

    from transformers import AutoModelForCausalLM

    if attention == "eager":
        return attention
    try:
        config = json.loads(sealed.read_bytes(Path(path) / "config.json"))
        from transformers import AutoConfig

        cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(config["model_type"]))]
    except (OSError, ValueError, KeyError):
        return attention
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(attention)
    return attention if flag is None or getattr(cls, flag, True) else "eager"


def load_reference(path: Path, device: str, frozen_dtype: str = "float32", attention: str = "sdpa"):
    """The frozen reference of a full DPO/GRPO run: the base in `frozen_dtype` (bf16 on a GPU), no gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet()
    with sealed.opened(path) as p:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=getattr(torch, frozen_dtype),
                                                     attn_implementation=supported_attention(path, attention))
    return model.to(device).eval().requires_grad_(False)


def lora_targets(model, lora: LoraConfig) -> list[str]:
    """The layers that get adapters: `lora.target_modules`, or when it names none, those of the architecture
    (`bases.lora_targets`: q/k/v/o + gate/up/down; Phi-3's fused qkv_proj and gate_up_proj)."""
    from appliance.train.bases import lora_targets as by_architecture

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if not lora.target_modules:
        targets = by_architecture(getattr(model.config, "architectures", None), present)
        if not targets:
            raise UsageError(f"no default LoRA targets for {model.config.architectures}",
                             "name its linear layers with --lora.target_modules")
        return targets
    targets = [t for t in lora.target_modules if t in present]
    if not targets:
        raise UsageError(f"lora.target_modules {lora.target_modules} match no layer of the base model",
                         "name linear layers such as q_proj, v_proj")
    return targets


def save_model(model, tokenizer, dest: Path, info: dict, state_dict: dict | None = None) -> None:
    """Write a transformers directory (or a PEFT adapter directory) with appliance.json, whole or not at all.

    Under a home's artifacts the files are built in memory and sealed (`appliance.sealed`): weights and
    configuration are serialized here the way `save_pretrained` writes them, since safetensors replaces the
    file it saves to; elsewhere (`model export`) they are plain files from `save_pretrained`.
    `state_dict`: full weights gathered from FSDP shards, when the model itself holds only a shard.
    """
    quiet()
    if sealed.home_artifacts(dest) is None:  # by where it goes, never by whether a store is registered
        with atomic_dir(dest) as tmp:
            kw = {"state_dict": state_dict} if state_dict is not None else {}
            model.save_pretrained(str(tmp), safe_serialization=True, **kw)
            tokenizer.save_pretrained(str(tmp))
            (tmp / "appliance.json").write_text(json.dumps(info, indent=2, default=str))
        return
    vocab_files = tuple(getattr(tokenizer, "vocab_files_names", {}).values())  # tokenizer.model, vocab.json ...
    with sealed.building(dest, tuple(dict.fromkeys(MODEL_JSON + sealed.TOKENIZER_FILES + vocab_files))) as d:
        for name, data in model_files(model, state_dict, d.path).items():
            d.add(name, MemFile.of(name, data))
        tokenizer.save_pretrained(str(d.path))
        d.add("appliance.json", MemFile.of("appliance.json", json.dumps(info, indent=2, default=str).encode()))


MODEL_JSON = ("config.json", "generation_config.json", "adapter_config.json")


def model_files(model, state_dict: dict | None, into: Path) -> dict[str, bytes]:
    """The weights of `model` as `save_pretrained` would write them, in memory; its JSON files are written
    into `into` (links to in-memory files) by their own `save_pretrained`, which writes through them."""
    import safetensors.torch

    if hasattr(model, "peft_config"):  # a PEFT adapter: adapter_model.safetensors + adapter_config.json
        from peft.utils import get_peft_model_state_dict

        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
        weights = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name)
        cfg = model.peft_config[name]
        if cfg.base_model_name_or_path is None:  # as PeftModel.save_pretrained fills them in
            cfg.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path", None) or None
        mapping = None
        if cfg.task_type is None:
            cls = model._get_base_model_class(is_prompt_tuning=cfg.is_prompt_learning)
            mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        inference = cfg.inference_mode
        cfg.inference_mode = True
        try:
            cfg.save_pretrained(str(into), auto_mapping_dict=mapping)
        finally:
            cfg.inference_mode = inference
        return {"adapter_model.safetensors": safetensors.torch.save(
            {k: v.detach().contiguous() for k, v in weights.items()}, metadata={"format": "pt"})}
    from transformers.modeling_utils import remove_tied_weights_from_state_dict, revert_weight_conversion

    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(str(into))
    if model.can_generate():
        model.generation_config.save_pretrained(str(into))
    weights = model.state_dict() if state_dict is None else state_dict
    weights = revert_weight_conversion(model, remove_tied_weights_from_state_dict(weights, model))
    return {"model.safetensors": safetensors.torch.save(
        {k: v.detach().contiguous() for k, v in weights.items()}, metadata={"format": "pt"})}


def merge_adapter(base_path: Path, adapter_path: Path, dest: Path, info: dict) -> None:
    """Base (full precision) + adapter -> one plain model directory."""
    quiet()  # before peft is imported
    import torch
    from transformers import AutoModelForCausalLM

    with sealed.opened(base_path) as b, sealed.opened(adapter_path) as a, bitsandbytes_hidden():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(b), local_files_only=True, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(a), local_files_only=True).merge_and_unload()
    save_model(merged, load_tokenizer(adapter_path), dest, info)


def tree_hash(root: Path) -> str:
    """sha256 over (relative path, file sha256) of every file, sorted: the content hash of a directory (of its
    plaintext, for a sealed artifact)."""
    if sealed.is_sealed(root):
        return sealed.need(root).tree_hash(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()
