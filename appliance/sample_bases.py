"""Tiny open-weight-style bases, built locally, as a site would bring them: each family's architecture and
the tokenizer shape its real releases ship, with random weights and a vocabulary trained on sample text.

No hub is reachable, and none is needed to exercise the path a real base takes (import, fine-tune, merge,
GGUF export with its report): the demo imports the Qwen2-style one, and benchmarks/byo_bases.py runs them all.

| family | architecture | tokenizer as its releases ship it |
| --- | --- | --- |
| llama3 | LlamaForCausalLM, llama3 RoPE scaling | byte-level BPE, Llama 3 split regex, ignore_merges |
| mistral | MistralForCausalLM, head_dim, sliding window | SentencePiece BPE as Mistral v0.3 ships it (Metaspace) |
| qwen2 | Qwen2ForCausalLM (QKV biases, tied) | byte-level BPE, `Qwen2Tokenizer` (Qwen2 split, NFC) |
| qwen3 | Qwen3ForCausalLM (Q/K norms, head_dim) | as Qwen2 |
| phi3 | Phi3ForCausalLM (fused QKV and gate/up) | SentencePiece BPE with the dummy-prefix normalizer (Llama 2's form) |
| gemma2 | Gemma2ForCausalLM (soft-caps, +1 norms, GELU) | SentencePiece BPE without a space prefix, `GemmaTokenizer` |
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2")
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_ARCH = {
    "llama3": ("Llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 128})),
    "mistral": ("Mistral", dict(head_dim=32, sliding_window=256)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    "phi3": ("Phi3", dict(num_key_value_heads=4)),
    "gemma2": ("Gemma2", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=256, tie_word_embeddings=True)),
}


def build(family: str, dest: Path, texts: Iterable[str], vocab_size: int = 1024, seed: int = 0,
          shape: dict | None = None, tokenizer=None) -> Path:
    """A `family` base in `dest` (bf16 safetensors, tokenizer files, no chat template): what `train import` takes.

    `shape` overrides the model's sizes; `tokenizer` (a transformers tokenizer, e.g. a real release's vocabulary)
    is saved instead of one trained on `texts`."""
    import torch
    import transformers

    if family not in _ARCH:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    dest.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
        tok = tokenizer
    else:
        tok = _tokenizer(family, dest, list(texts), vocab_size)
    cls, kw = _ARCH[family]
    ids = dict(vocab_size=-(-len(tok) // 64) * 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{cls}Config")(**{**SHAPE, **kw, **(shape or {})}, **ids)
    model = getattr(transformers, f"{cls}ForCausalLM")(config)
    model.to(torch.bfloat16).save_pretrained(dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "_name_or_path": f"site/{family}-tiny"}, indent=2))
    return dest


def _tokenizer(family: str, dest: Path, texts: list[str], vocab_size: int):
    from transformers import AutoTokenizer

    if family in ("mistral", "phi3", "gemma2"):
        spec = _sentencepiece_bpe(texts, vocab_size)
        spec["post_processor"] = _bos("<s>", 1)
        if family == "mistral":  # Mistral v0.3's tokenizer.json: Metaspace, not a normalizer
            spec["normalizer"] = None
            spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                     "split": False}
        cls = "GemmaTokenizer" if family == "gemma2" else "LlamaTokenizer"
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                  "add_eos_token": False, "legacy": False}  # as Mistral's and Phi-3's releases have it
        if family == "gemma2":
            config.update(pad_token="<unk>", mask_token="<unk>")
    else:
        spec = _byte_level_bpe(texts, vocab_size, family)
        if family == "llama3":
            spec["post_processor"] = _bos("<|begin_of_text|>", 0)
        cls = "Qwen2Tokenizer" if family.startswith("qwen") else "TokenizersBackend"
        config = ({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
                  if family.startswith("qwen") else
                  {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"})
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, **config,
                                                            "model_max_length": SHAPE["max_position_embeddings"]}))
    return AutoTokenizer.from_pretrained(str(dest), local_files_only=True)


def _bos(token: str, token_id: int) -> dict:
    """A post-processor that starts every sequence with BOS, as the family's releases do."""
    bos, seq = {"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [bos, seq],
            "pair": [bos, seq, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}}}


def _byte_level_bpe(texts: list[str], vocab_size: int, family: str) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if family.startswith("qwen")
                else ["<|begin_of_text|>", "<|end_of_text|>"])
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return json.loads(tok.to_str())


def _sentencepiece_bpe(texts: list[str], vocab_size: int) -> dict:
    """A SentencePiece-shaped BPE: <unk> <s> </s>, the 256 byte tokens, then merges learnt within words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")  # training only
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    spec = json.loads(tok.to_str())
    learnt = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    order += [t for t, _ in learnt if t not in order]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    spec["added_tokens"] = [{**t, "id": order.index(t["content"])} for t in spec["added_tokens"]]
    spec["pre_tokenizer"] = None
    return spec
