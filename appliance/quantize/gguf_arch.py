"""What each architecture family needs to become a GGUF that computes what transformers computes.

One `Family` per supported transformers class: the llama.cpp arch it becomes, the per-layer tensor name map
(hf suffix -> GGUF name, with the transform each tensor needs), the checks on its config and the metadata
llama.cpp reads for it. The names are llama.cpp's (`gguf.TENSOR_NAMES` for `gguf.MODEL_TENSORS[arch]`;
tests/test_gguf_arch.py checks every mapped name against them). What a family does not cover is refused
with one line naming it: a GGUF that loads but computes something else is worse than none.

Things a converter must get right per family (each is proven by a logits test against transformers):
- llama / mistral / mixtral -> `llama`: llama.cpp rotates adjacent pairs, transformers rotates halves, so the
  rows of Q and K are permuted per head. Llama 3 RoPE scaling becomes the `rope_freqs` tensor (one divisor
  per rotary frequency), as llama.cpp's converter writes it.
- qwen2, qwen3, phi3, gemma2: llama.cpp rotates them NeoX-style (halves), so no permutation.
- qwen2: Q/K/V biases. qwen3: per-head RMSNorm of Q and K. phi3: fused `attn_qkv` and `ffn_up` (gate rows
  first, as llama.cpp's fused SwiGLU splits it). gemma2: RMSNorm weights stored +1 (transformers computes
  x*(1+w)), GELU(tanh), embeddings scaled by sqrt(hidden) inside llama.cpp, soft-capping keys, sliding window
  on even layers.
- Sliding-window attention that llama.cpp does not implement for the arch (Mistral, Qwen2, Phi-3) is exact
  as full attention up to the window, so the GGUF's context length is capped at the window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.quantize.types import QuantizeError

# (gguf suffix, hf suffix, transform): transform is "" (as is), "q"/"k" (rotary permutation, per query/KV
# head) or "+1" (norm stored with its offset).
Row = tuple[str, str, str]

_ATTN: list[Row] = [("attn_norm.weight", "input_layernorm.weight", ""),
                    ("attn_q.weight", "self_attn.q_proj.weight", "q"),
                    ("attn_k.weight", "self_attn.k_proj.weight", "k"),
                    ("attn_v.weight", "self_attn.v_proj.weight", ""),
                    ("attn_output.weight", "self_attn.o_proj.weight", "")]
_MLP: list[Row] = [("ffn_norm.weight", "post_attention_layernorm.weight", ""),
                   ("ffn_gate.weight", "mlp.gate_proj.weight", ""),
                   ("ffn_up.weight", "mlp.up_proj.weight", ""),
                   ("ffn_down.weight", "mlp.down_proj.weight", "")]
_NEOX_ATTN: list[Row] = [(g, h, "") for g, h, _ in _ATTN]


@dataclass(frozen=True)
class Family:
    """One transformers architecture and how it maps onto a llama.cpp arch."""

    model_type: str
    hf_class: str
    arch: str  # llama.cpp's arch name (gguf.MODEL_ARCH_NAMES)
    layer: list[Row]  # per-layer tensors (mixtral's experts are stacked by gguf_export)
    act: str = "silu"
    native_swa: bool = False  # llama.cpp implements this family's sliding window itself
    llama3_rope: bool = False  # the arch reads a `rope_freqs` tensor
    global_shift: str = ""  # transform of the final norm ("+1" for gemma2)
    tied_only: bool = False  # llama.cpp always reuses token_embd as the output


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", _ATTN + _MLP, llama3_rope=True),
    Family("mistral", "MistralForCausalLM", "llama", _ATTN + _MLP, llama3_rope=True),
    Family("mixtral", "MixtralForCausalLM", "llama", _ATTN + _MLP[:1]),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2",
           _NEOX_ATTN + [("attn_q.bias", "self_attn.q_proj.bias", ""), ("attn_k.bias", "self_attn.k_proj.bias", ""),
                         ("attn_v.bias", "self_attn.v_proj.bias", "")] + _MLP),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3",
           _NEOX_ATTN + [("attn_q_norm.weight", "self_attn.q_norm.weight", ""),
                         ("attn_k_norm.weight", "self_attn.k_norm.weight", "")] + _MLP),
    Family("phi3", "Phi3ForCausalLM", "phi3",
           [("attn_norm.weight", "input_layernorm.weight", ""), ("attn_qkv.weight", "self_attn.qkv_proj.weight", ""),
            ("attn_output.weight", "self_attn.o_proj.weight", ""),
            ("ffn_norm.weight", "post_attention_layernorm.weight", ""),
            ("ffn_up.weight", "mlp.gate_up_proj.weight", ""), ("ffn_down.weight", "mlp.down_proj.weight", "")]),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2",
           [("attn_norm.weight", "input_layernorm.weight", "+1")] + _NEOX_ATTN[1:]
           + [("post_attention_norm.weight", "post_attention_layernorm.weight", "+1"),
              ("ffn_norm.weight", "pre_feedforward_layernorm.weight", "+1"),
              ("post_ffw_norm.weight", "post_feedforward_layernorm.weight", "+1")] + _MLP[1:],
           act="gelu_pytorch_tanh", native_swa=True, global_shift="+1", tied_only=True),
)}
SUPPORTED = {k: f.hf_class for k, f in FAMILIES.items()}
_HINT = ("GGUF export handles " + ", ".join(sorted({f.hf_class for f in FAMILIES.values()}))
         + " (see docs/QUANTIZE.md)")


def family(cfg: dict) -> Family:
    """The family of a config.json, after every check; one QuantizeError naming all that is unsupported."""
    kind = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if cfg.get("auto_map"):
        raise QuantizeError(f"model {kind!r} uses custom code (auto_map: {', '.join(cfg['auto_map'])})",
                            "export handles transformers' own architectures only: " + _HINT)
    if kind not in FAMILIES:
        raise QuantizeError(f"unsupported architecture {kind!r} ({', '.join(archs) or 'no architectures'})", _HINT)
    fam = FAMILIES[kind]
    problems = [f"architectures {archs} (expected {fam.hf_class})"] if archs and archs != [fam.hf_class] else []
    problems += _config_problems(cfg, fam)
    if problems:
        raise QuantizeError(f"unsupported {fam.hf_class} variant: {', '.join(problems)}", _HINT)
    return fam


def _config_problems(cfg: dict, fam: Family) -> list[str]:
    problems = []
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act != fam.act:
        problems.append(f"activation {act} (llama.cpp's {fam.arch} uses {fam.act})")
    if cfg.get("mlp_bias"):
        problems.append("MLP biases")
    if cfg.get("attention_bias") and fam.model_type != "qwen2":
        problems.append("attention biases")
    rope = rope_parameters(cfg)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind != "default" and not (kind == "llama3" and fam.llama3_rope):
        problems.append(f"rope scaling {kind!r}")
    heads = cfg["num_attention_heads"]
    if fam.model_type == "phi3" and head_dim(cfg) != cfg["hidden_size"] // heads:
        problems.append(f"head_dim {head_dim(cfg)} != hidden_size/heads")
    if fam.model_type == "gemma2":
        problems += _gemma2_problems(cfg)
    return problems


def _gemma2_problems(cfg: dict) -> list[str]:
    problems = []
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not cfg.get(key):
            problems.append(f"no {key} (llama.cpp's gemma2 always caps)")
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 46-layer 27B
    want = (cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 46
            else head_dim(cfg))
    if cfg.get("query_pre_attn_scalar", want) != want:
        problems.append(f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']} (llama.cpp uses {want})")
    types = cfg.get("layer_types")
    pattern = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])]
    if types and list(types) != pattern:
        problems.append("layer_types other than sliding on even layers, full on odd")
    return problems


def rope_parameters(cfg: dict) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_scaling` and `rope_theta`."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return rope


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def window(cfg: dict) -> int | None:
    """The sliding window when some layer really uses one (shorter than the context), else None."""
    w = cfg.get("sliding_window")
    if not w or cfg.get("use_sliding_window") is False:
        return None
    types = cfg.get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None
    return w if w < cfg.get("max_position_embeddings", 2048) else None


def context_length(cfg: dict, fam: Family) -> int:
    """Trained context; capped at the window where llama.cpp would attend fully past it."""
    n = cfg.get("max_position_embeddings", 2048)
    w = window(cfg)
    return min(n, w) if w and not fam.native_swa else n


def layer_rows(fam: Family, cfg: dict) -> list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]:
    """(gguf suffix, hf suffix, transform) for one layer; the prefixes `blk.N.`/`model.layers.N.` are added by
    the caller."""
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    return [(g, h, transform(t, n_head, n_kv)) for g, h, t in fam.layer]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head*head_dim, hidden) rows from halves-per-head order to interleaved pairs, as llama.cpp rotates."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(kind: str, n_head: int, n_kv: int) -> Callable[[np.ndarray], np.ndarray]:
    # permute_qk is looked up when the tensor is written, so a test can swap it to show it matters
    if kind == "q":
        return lambda a: permute_qk(a, n_head)
    if kind == "k":
        return lambda a: permute_qk(a, n_kv)
    if kind == "+1":
        return lambda a: a + np.float32(1.0)
    return lambda a: a


def extra_tensors(fam: Family, cfg: dict) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """Tensors llama.cpp needs that the checkpoint lacks: Llama 3's RoPE frequency divisors."""
    rope = rope_parameters(cfg)
    if not (fam.llama3_rope and rope.get("rope_type", rope.get("type")) == "llama3"):
        return []
    factors = llama3_rope_factors(rope, head_dim(cfg))
    return [("rope_freqs.weight", factors.shape, lambda: factors)]


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """(dim/2,) divisors of each rotary frequency: transformers' llama3 inv_freq = base inv_freq / factor."""
    base = float(rope["rope_theta"])
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_hparams(wr, cfg: dict, fam: Family) -> None:
    """The keys llama.cpp reads for this arch, beyond the common ones gguf_export writes."""
    rope = rope_parameters(cfg)
    hd = head_dim(cfg)
    if fam.model_type == "phi3":
        wr.add_rope_dimension_count(int(float(rope["partial_rotary_factor"]) * hd))
        wr.add_rope_scaling_orig_ctx_len(int(cfg.get("original_max_position_embeddings")
                                             or cfg.get("max_position_embeddings", 2048)))
    else:
        wr.add_rope_dimension_count(hd)
    if fam.model_type == "gemma2" or hd != cfg["hidden_size"] // cfg["num_attention_heads"]:
        wr.add_key_length(hd)
        wr.add_value_length(hd)
    if fam.model_type == "gemma2":
        wr.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        wr.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        wr.add_sliding_window(int(cfg.get("sliding_window") or cfg.get("max_position_embeddings", 2048)))


# llama.cpp changes special tokens' attributes when general.name contains these (and fails to load a vocabulary
# without Phi-3's own tokens); appliance.id keeps the real name.
_NAME_TRIGGERS = re.compile(r"phi-?3|modern-bert", re.IGNORECASE)


def general_name(name: str) -> str:
    """`name` as general.name, with the substrings llama.cpp keys tokenizer behaviour on broken up."""
    return _NAME_TRIGGERS.sub(lambda m: m.group(0).replace("-", "")[:-1] + "_" + m.group(0)[-1], name)
