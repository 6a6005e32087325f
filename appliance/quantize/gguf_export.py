"""Model directory -> GGUF, written with the `gguf` package's writer: no converter script, no torch.

Each architecture family (Llama, Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Gemma 2) maps to its llama.cpp arch
through `gguf_arch`, which also refuses what it does not cover. Two things every converter must get right, or
the file loads and quietly degrades:
- rotary layout: transformers' Llama rotates the two halves of each head (rotate_half), llama.cpp rotates
  adjacent pairs, so the rows of Q and K are permuted per head (`gguf_arch.permute_qk`); the logits test catches it.
- the tokenizer: the family (llama.cpp tokenizer and pre-tokenizer) must be named exactly; `gguf_vocab`
  recognises it from tokenizer.json or refuses; the tokenizer agreement check proves it on vault text.
Tensors stream one at a time from the memory-mapped safetensors, so a model larger than RAM exports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.quantize import gguf_arch
from appliance.quantize.gguf_vocab import read_vocab, write_metadata
from appliance.quantize.safetensors import Weights
from appliance.quantize.types import QuantizeError

SUPPORTED = gguf_arch.SUPPORTED
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


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise QuantizeError(f"{model_dir} is not a model directory (no config.json)",
                            "pass a model id (see `appliance train models`) or a transformers model directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise QuantizeError(f"{path} is not valid JSON ({e})", "re-save the model") from e
    gguf_arch.family(cfg)  # refuses, in one line, whatever llama.cpp would compute differently
    return cfg


def plan(model_dir: Path) -> Plan:
    """Check the model and map every tensor to its GGUF name; reads headers only."""
    cfg = read_config(model_dir)
    fam = gguf_arch.family(cfg)
    w = Weights(model_dir)
    n_vocab = cfg["vocab_size"]
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
    tensors.extend(gguf_arch.extra_tensors(fam, cfg))
    rows = gguf_arch.layer_rows(fam, cfg)
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for gguf_name, hf_name, fn in rows:
            add(b + gguf_name, p + hf_name, fn)
        if cfg["model_type"] == "mixtral":
            tensors.extend(_experts(w, cfg, p, b, used))
    add("output_norm.weight", "model.norm.weight", gguf_arch.transform(fam.global_shift, 0, 0))
    tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in w
    if fam.tied_only and not tied:
        raise QuantizeError(f"{fam.hf_class} with an untied lm_head.weight: llama.cpp's {fam.arch} reuses the "
                            "embeddings as the output", "tie the output to the embeddings, or export elsewhere")
    if not tied:
        add("output.weight", "lm_head.weight")
    else:
        used.add("lm_head.weight")  # tied: llama.cpp reuses token_embd for the output
    left = [n for n in w.names() if n not in used and not n.endswith(_HIDDEN_ROT)]
    if left:
        raise QuantizeError(f"unsupported model: tensors with no GGUF mapping ({', '.join(left[:3])}"
                            f"{', ...' if len(left) > 3 else ''})", f"export maps the {fam.hf_class} layout only")
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
    fam = gguf_arch.family(cfg)
    n_head = cfg["num_attention_heads"]
    context = gguf_arch.context_length(cfg, fam)
    wr = gguf.GGUFWriter(str(dest), fam.arch)
    wr.add_name(gguf_arch.general_name(meta.get("name", model_dir.name)))
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_context_length(context)
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(n_head)
    wr.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    gguf_arch.write_hparams(wr, cfg, fam)
    wr.add_rope_freq_base(float(gguf_arch.rope_parameters(cfg)["rope_theta"]))
    wr.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    wr.add_vocab_size(cfg["vocab_size"])
    if cfg["model_type"] == "mixtral":
        wr.add_expert_count(cfg["num_local_experts"])
        wr.add_expert_used_count(cfg["num_experts_per_tok"])
    write_metadata(wr, v)  # tokenizer family, vocabulary, special ids, template (gguf_vocab)
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
            "vocab": cfg["vocab_size"], "context": context,
            "chat_template": bool(v["chat_template"]), "eos": v["eos"], "eot": v["eot"]}
