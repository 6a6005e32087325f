"""Each architecture family the GGUF exporter takes, proven against transformers through llama.cpp.

A tiny random model per family (64 wide, 2 layers, 4 heads, 2 KV heads) is built from its transformers config
class, saved with save_pretrained, exported to f32 by the appliance's writer and loaded by llama.cpp; the
logits on a few token sequences must match transformers'. The weights are drawn wider than a fresh init
(norms and biases too), so that a wrong permutation, a missing +1 or a missing bias shows in the logits.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)
WORDS = ("the valve pump seal north river audit ledger quarterly inspection boiler report shift crew torque "
         "gasket pressure safety manual chapter supplier invoice cargo port harbour tide crane forklift").split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A byte-level BPE made as `appliance train tokenizer` makes it (same special tokens and template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from appliance.train.tokenizer import BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + rng.choice(".,!?") for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE)
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(d))
    return d


def texts() -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(3)]


def build(tok_dir: Path, out: Path, config_cls: str, dtype=None, shard: str | None = None, **kw) -> Path:
    """save_pretrained of a random model of `config_cls` with the tokenizer beside it."""
    import shutil

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # padded, as many models pad theirs; transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer, which
    # adds <|endoftext|> after the trained vocabulary
    n_vocab = len(transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))) + 16
    cfg = getattr(transformers, config_cls)(**{**SMALL, "vocab_size": n_vocab, "bos_token_id": 0,
                                               "eos_token_id": 1, "pad_token_id": 2, **kw})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gemma = cfg.model_type == "gemma2"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:  # gemma stores offsets from 1, the others the scale itself
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if p.ndim == 1 else 0.15)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out), **({"max_shard_size": shard} if shard else {}))
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def ggml_gelu():
    """llama.cpp's CPU GELU: a table over fp16 inputs holding fp16 outputs (ggml-cpu/vec.h, GGML_GELU_FP16)."""
    import torch
    import torch.nn.functional as F

    class GeluFp16(torch.nn.Module):
        def forward(self, x):
            y = F.gelu(x.half().float(), approximate="tanh").half().float()
            return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), y))

    return GeluFp16()


def compare(model_dir: Path, gguf: Path, n_ctx: int = 128, fp16_gelu: bool = False) -> tuple[float, float]:
    """(max |logit diff|, top-1 agreement) of llama.cpp on the GGUF vs transformers in fp32, over texts().

    With `fp16_gelu` transformers' GELU is replaced by llama.cpp's table lookup, so what is left is the export.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.quantize import llama

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    if fp16_gelu:
        for layer in hf.model.layers:
            layer.mlp.act_fn = ggml_gelu()
    llama.check(gguf)
    llama.lib()  # llama.cpp's log captured, as llama.load does
    from llama_cpp import Llama

    # an f32 KV cache: llama.cpp's default f16 cache alone moves logits by ~5e-3
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1, n_threads_batch=1,
                type_k=0, type_v=0, verbose=bool(__import__("os").environ.get("APPLIANCE_DEBUG")))
    diff, agree, n = 0.0, 0, 0
    try:
        for text in texts():
            ids = tok(text, add_special_tokens=False)["input_ids"][:44]  # past gemma2's window, within mistral's
            assert len(ids) == 44
            with torch.no_grad():
                a = hf(torch.tensor([ids])).logits[0].numpy()  # (T, vocab)
            llm.reset()
            llm.eval(ids)
            b = np.asarray(llm.scores[:len(ids)])
            diff = max(diff, float(np.abs(a - b).max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n += len(ids)
    finally:
        llm.close()
    return diff, agree / n


def export(model_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    from appliance.quantize import gguf_export

    out = tmp_path / "m.gguf"
    return out, gguf_export.write(model_dir, out, {"id": model_dir.name})


FAMILIES = {
    # Llama 3 RoPE scaling with an original context short enough that the test's positions feel it
    "llama3": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    # sliding window shorter than the context (GGUF context capped at it) and head_dim != hidden/heads
    "mistral": ("MistralConfig", dict(sliding_window=48, head_dim=32)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    # half the head rotated: llama.cpp's rope.dimension_count
    "phi3": ("Phi3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5})),
    # window 16 < the test's sequences, so llama.cpp's own sliding window is exercised on layer 0
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}
ARCH = {"llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
        "gemma2": "gemma2"}


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_each_family_exports_to_the_same_logits_as_transformers(tok_dir, tmp_path, fam):
    import gguf

    from appliance.quantize import gguf_export, llama

    cls, kw = FAMILIES[fam]
    d = build(tok_dir, tmp_path / fam, cls, **kw)
    out, info = export(d, tmp_path)
    arch = gguf.MODEL_ARCH[ARCH[fam].upper()]
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    names = {re.sub(r"^blk\.\d+\.", "blk.{bid}.", n).rsplit(".", 1)[0] for n, _, _ in gguf_export.plan(d).tensors}
    assert names <= allowed, names - allowed  # every name is one llama.cpp's arch takes
    meta = llama.check(out)["fields"]
    assert meta["general.architecture"] == ARCH[fam]
    assert meta["context_length"] == (48 if fam == "mistral" else 256) == info["context"]
    diff, top1 = compare(d, out, fp16_gelu=fam == "gemma2")
    print(f"{fam}: max|logit diff| {diff:.2e} top-1 {top1}")
    assert top1 == 1.0 and diff < 1e-3
    if fam == "gemma2":  # against stock transformers, llama.cpp's fp16 GELU table adds ~1e-3
        diff, top1 = compare(d, out)
        print(f"{fam} (exact GELU): max|logit diff| {diff:.2e} top-1 {top1}")
        assert top1 == 1.0 and diff < 5e-3


def test_llama3_rope_freqs_matter(tok_dir, tmp_path, monkeypatch):
    """Without the `rope_freqs` tensor llama.cpp runs plain RoPE: the logits move, so the test above sees it."""
    from appliance.quantize import gguf_arch

    cls, kw = FAMILIES["llama3"]
    d = build(tok_dir, tmp_path / "l3", cls, **kw)
    factors = gguf_arch.llama3_rope_factors(gguf_arch.rope_parameters(kw), 16)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0  # high, low and smoothed bands
    monkeypatch.setattr(gguf_arch, "extra_tensors", lambda fam, cfg: [])  # what a converter without it writes
    out, _ = export(d, tmp_path)
    diff, _ = compare(d, out)
    print(f"llama3 without rope_freqs: max|logit diff| {diff:.2e}")
    assert diff > 1e-2


def test_gemma2_sliding_window_is_exercised(tok_dir, tmp_path, monkeypatch):
    """The sequences run past gemma2's window: without the window key llama.cpp attends fully and differs."""
    import gguf

    cls, kw = FAMILIES["gemma2"]
    d = build(tok_dir, tmp_path / "g2", cls, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window", lambda self, n: None)  # llama.cpp's default: 4096
    out, _ = export(d, tmp_path)
    diff, _ = compare(d, out, fp16_gelu=True)
    print(f"gemma2 without its sliding window: max|logit diff| {diff:.2e}")
    assert diff > 1e-2


def test_bf16_and_sharded_checkpoints_export_exactly(tok_dir, tmp_path):
    import torch

    cls, kw = FAMILIES["qwen2"]
    d = build(tok_dir, tmp_path / "bf16", cls, dtype=torch.bfloat16, shard="60KB", **kw)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    out, _ = export(d, tmp_path)
    diff, top1 = compare(d, out)  # transformers widens the same bf16 weights to fp32
    assert top1 == 1.0 and diff < 1e-3


def test_q8_0_of_a_family_loads_and_generates(tok_dir, tmp_path):
    from appliance.quantize import llama
    from appliance.quantize.types import TYPES

    cls, kw = FAMILIES["qwen3"]
    d = build(tok_dir, tmp_path / "q3", cls, **kw)
    f32, _ = export(d, tmp_path)
    q8 = tmp_path / "q8.gguf"
    llama.quantize(f32, q8, TYPES["q8_0"], threads=1)
    assert {t["type"] for t in llama.tensor_types(q8)} == {"f32", "q8_0"}
    llm = llama.load(q8, n_ctx=64, threads=1)
    try:
        out = llm("the valve", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] >= 1


def _config_only(tmp_path: Path, cfg: dict) -> Path:
    import json

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**SMALL, "vocab_size": 300, **cfg}))
    return d


@pytest.mark.parametrize("cfg, says", [
    ({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}, "unsupported architecture 'gpt_neox'"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}, "uses custom code"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"model_type": "qwen2", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope"}}, "rope scaling 'longrope'"),
    ({"model_type": "llama", "mlp_bias": True}, "MLP biases"),
    ({"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "head_dim": 32, "query_pre_attn_scalar": 64,
      "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, "query_pre_attn_scalar 64"),
    ({"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
      "attn_logit_softcapping": 50.0}, "no final_logit_softcapping"),
])
def test_what_is_not_handled_is_refused_in_one_line_with_nothing_written(tmp_path, cfg, says):
    from appliance.quantize import gguf_export
    from appliance.quantize.types import QuantizeError

    d = _config_only(tmp_path, cfg)
    out = tmp_path / "m.gguf"
    with pytest.raises(QuantizeError) as e:
        gguf_export.write(d, out, {"id": "m"})
    assert says in str(e.value) and "\n" not in str(e.value) and e.value.hint
    assert not out.exists()
