"""Model directory -> GGUF, written with the `gguf` package's writer: no converter script, no torch.

Llama-architecture models (dense, and the Mixtral-shaped MoE preset) map to llama.cpp's `llama` arch.
Two things a converter must get right, or the file loads and quietly degrades:
- rotary layout: transformers' Llama rotates the two halves of each head (rotate_half), llama.cpp rotates
  adjacent pairs, so the rows of Q and K are permuted per head (`permute_qk`); the logits test catches it.
- the tokenizer: a byte-level BPE is declared with the `gpt-2` pre-tokenizer, whose split regex is the one
  `tokenizers`' ByteLevel(use_regex=True) applies; the tokenizer agreement check proves it on vault text.
Tensors stream one at a time from the memory-mapped safetensors, so a model larger than RAM exports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.quantize.safetensors import Weights
from appliance.quantize.types import QuantizeError

ARCH = "llama"
SUPPORTED = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
_HIDDEN_ROT = "rotary_emb.inv_freq"


@dataclass
class Plan:
    """What will be written: the tensors in order (GGUF name, shape, how to make it) and the metadata."""

    tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]
    config: dict
    vocab: dict

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for _, s, _ in self.tensors)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head*head_dim, hidden) rows from halves-per-head order to interleaved pairs, as llama.cpp rotates."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise QuantizeError(f"{model_dir} is not a model directory (no config.json)",
                            "pass a model id (see `appliance train models`) or a transformers model directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise QuantizeError(f"{path} is not valid JSON ({e})", "re-save the model") from e
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise QuantizeError(f"unsupported architecture {kind!r} ({', '.join(cfg.get('architectures') or [])})",
                            "GGUF export handles Llama-architecture models: dense (llama) and MoE (mixtral)")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("biases in attention or MLP")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    window = cfg.get("sliding_window")
    if window and window < cfg.get("max_position_embeddings", 0):
        problems.append(f"sliding-window attention ({window})")
    if problems:
        raise QuantizeError(f"unsupported model variant: {', '.join(problems)}",
                            "GGUF export handles plain Llama/Mixtral models "
                            "(SiLU, no biases, default RoPE, full attention)")
    return cfg


def read_vocab(model_dir: Path, n_vocab: int) -> dict:
    """Tokens, types, merges and special ids for GGUF, from tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer

    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        raise QuantizeError(f"{model_dir} has no tokenizer.json",
                            "a GGUF carries its tokenizer: save the tokenizer beside the model")
    spec = json.loads(tj.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise QuantizeError(f"tokenizer model {model.get('type')!r} is not supported",
                            "GGUF export handles byte-level BPE tokenizers (`appliance train tokenizer`)")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    tcfg = _json(model_dir / "tokenizer_config.json")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: s for s, i in vocab.items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    if by_id and max(by_id) >= n_vocab:
        raise QuantizeError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {n_vocab}",
                            "the tokenizer does not belong to this model")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # rows the model pads its vocabulary with; never produced
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i].get("special") else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(key: str) -> int | None:
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return vocab.get(tok, next((i for i, t in added.items() if t["content"] == tok), None)) if tok else None

    hf = Tokenizer.from_str(tj.read_text())
    probe = hf.encode("a", add_special_tokens=True).ids
    bos, eos = special("bos_token"), special("eos_token")
    template = tcfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "bos": bos, "eos": eos,
            "pad": special("pad_token"), "eot": vocab.get("<|im_end|>"),
            "add_bos": bool(probe) and probe[0] == bos, "add_eos": bool(probe) and probe[-1] == eos and len(probe) > 1,
            "chat_template": template}


def _pre_tokenizer(pre: dict | None) -> str:
    """The llama.cpp pre-tokenizer whose split rules equal this tokenizer's; refuse what has none."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    raise QuantizeError(f"pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent",
                        "export handles byte-level BPE with the GPT-2 split (as `appliance train tokenizer` makes)")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise QuantizeError(f"{path} is not valid JSON ({e})", "re-save the tokenizer") from e


def plan(model_dir: Path) -> Plan:
    """Check the model and map every tensor to its GGUF name; reads headers only."""
    cfg = read_config(model_dir)
    w = Weights(model_dir)
    n_vocab, n_head = cfg["vocab_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    vocab = read_vocab(model_dir, n_vocab)
    used: set[str] = set()

    def take(name: str, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a):
        used.add(name)
        return w.shape(name), (lambda: fn(w.get(name)))

    tensors: list = []

    def add(gguf_name: str, hf_name: str, fn=lambda a: a) -> None:
        shape, make = take(hf_name, fn)
        tensors.append((gguf_name, shape, make))

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight")
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", lambda a: permute_qk(a, n_head))
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", lambda a: permute_qk(a, n_kv))
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight")
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        if cfg["model_type"] == "mixtral":
            tensors.extend(_experts(w, cfg, p, b, used))
        else:
            add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight")
            add(b + "ffn_up.weight", p + "mlp.up_proj.weight")
            add(b + "ffn_down.weight", p + "mlp.down_proj.weight")
    add("output_norm.weight", "model.norm.weight")
    if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" in w:
        add("output.weight", "lm_head.weight")
    else:
        used.add("lm_head.weight")  # tied: llama.cpp reuses token_embd for the output
    left = [n for n in w.names() if n not in used and not n.endswith(_HIDDEN_ROT)]
    if left:
        raise QuantizeError(f"unsupported model: tensors with no GGUF mapping ({', '.join(left[:3])}"
                            f"{', ...' if len(left) > 3 else ''})", "export handles plain Llama/Mixtral models")
    return Plan(tensors, cfg, vocab)


def _experts(w: Weights, cfg: dict, p: str, b: str, used: set[str]) -> Iterator:
    """Router and experts; per-expert matrices are stacked into one (n_expert, rows, cols) tensor each."""
    n = cfg["num_local_experts"]
    moe = p + "block_sparse_moe."
    if moe + "gate.weight" not in w:
        raise QuantizeError(f"MoE layer {p} is not in the Mixtral layout (block_sparse_moe.experts.N.w1/w2/w3)",
                            "re-save the model with save_pretrained")
    used.add(moe + "gate.weight")
    yield b + "ffn_gate_inp.weight", w.shape(moe + "gate.weight"), lambda: w.get(moe + "gate.weight")
    for gguf, hf in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
        names = [f"{moe}experts.{e}.{hf}.weight" for e in range(n)]
        used.update(names)
        yield (f"{b}{gguf}.weight", (n, *w.shape(names[0])),
               lambda names=names: np.stack([w.get(x) for x in names]))


def write(model_dir: Path, dest: Path, meta: dict, progress: Callable[[int, int], None] = lambda d, t: None,
          pl: Plan | None = None) -> dict:
    """Write `model_dir` as an f32 GGUF at `dest` (the caller renames it into place). Returns a summary."""
    import gguf

    pl = pl or plan(model_dir)
    cfg, v = pl.config, pl.vocab
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    wr = gguf.GGUFWriter(str(dest), ARCH)
    wr.add_name(meta.get("name", model_dir.name))
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_context_length(cfg.get("max_position_embeddings", 2048))
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(n_head)
    wr.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    wr.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // n_head:
        wr.add_key_length(head_dim)
        wr.add_value_length(head_dim)
    rope = cfg.get("rope_parameters") or {}
    wr.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    wr.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    wr.add_vocab_size(cfg["vocab_size"])
    if cfg["model_type"] == "mixtral":
        wr.add_expert_count(cfg["num_local_experts"])
        wr.add_expert_used_count(cfg["num_experts_per_tok"])
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(v["pre"])
    wr.add_token_list(v["tokens"])
    wr.add_token_types(v["types"])
    wr.add_token_merges(v["merges"])
    for key, fn in (("bos", wr.add_bos_token_id), ("eos", wr.add_eos_token_id), ("pad", wr.add_pad_token_id),
                    ("eot", wr.add_eot_token_id)):
        if v[key] is not None:
            fn(v[key])
    wr.add_add_bos_token(v["add_bos"])
    wr.add_add_eos_token(v["add_eos"])
    if v["chat_template"]:
        wr.add_chat_template(v["chat_template"])
    for key, value in meta.items():  # provenance: the appliance's own keys, ignored by llama.cpp
        wr.add_string(f"appliance.{key}", str(value))
    for name, shape, _ in pl.tensors:
        wr.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    total = sum(int(np.prod(s)) * 4 for _, s, _ in pl.tensors)
    done = 0
    try:
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_ti_data_to_file()
        for name, shape, make in pl.tensors:
            arr = np.ascontiguousarray(make(), dtype=np.float32)
            if arr.shape != shape:
                raise QuantizeError(f"tensor {name} has shape {arr.shape}, expected {shape}", "the model is corrupt")
            if not np.isfinite(arr).all():
                raise QuantizeError(f"tensor {name} holds NaN or Inf", "the model's weights are broken; retrain")
            wr.write_tensor_data(arr)
            done += arr.nbytes
            progress(done, total)
    finally:
        wr.close()
    return {"tensors": len(pl.tensors), "params": pl.n_params, "arch": cfg["model_type"],
            "vocab": cfg["vocab_size"], "context": cfg.get("max_position_embeddings", 2048),
            "chat_template": bool(v["chat_template"]), "eos": v["eos"], "eot": v["eot"]}
