"""Tokenizer families in the GGUF exporter, checked against llama.cpp's own test vectors.

For each family: llama.cpp's vocabulary-only GGUF -> a transformers tokenizer (`gguf_file=`), reshaped where
the real model's tokenizer.json differs from what transformers rebuilds -> a tiny random Llama beside it ->
our f32 GGUF -> llama.cpp tokenizes every line of the family's `.inp` as its `.out` says, and as transformers
does. The vectors come from the llama-cpp-python sdist (`make setup`; fixture `vocab_dir`).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from gguf import GGUFReader

from appliance.quantize import gguf_export, gguf_vocab, llama
from appliance.quantize.types import QuantizeError

SEP = "\n__ggml_vocab_test__\n"


def vectors(vocab_dir: Path, fam: str) -> list[tuple[str, list[int]]]:
    texts = (vocab_dir / f"ggml-vocab-{fam}.gguf.inp").read_text(encoding="utf-8").split(SEP)
    outs = (vocab_dir / f"ggml-vocab-{fam}.gguf.out").read_text(encoding="utf-8").split("\n")
    texts, outs = texts[:-1] if texts[-1] == "" else texts, outs[:-1] if outs[-1] == "" else outs
    assert len(texts) == len(outs) > 20
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def as_real_model(spec: dict, fam: str) -> dict:
    """What the real tokenizer.json has and transformers' GGUF rebuild lacks."""
    if fam == "llama-bpe":
        spec["model"]["ignore_merges"] = True  # Meta-Llama-3's tokenizer.json
    elif fam == "qwen2":
        spec["normalizer"] = {"type": "NFC"}  # Qwen2's tokenizer.json (Qwen3.5's has none: its .out keeps e + U+0301)
    elif fam == "llama-spm":  # Llama 2's tokenizer.json: SentencePiece's dummy prefix as a normalizer
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        spec["pre_tokenizer"] = None
    elif fam == "starcoder":  # bigcode/starcoder's tokenizer.json: digits one by one, then the GPT-2 regex
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    return spec


@pytest.fixture(scope="module")
def from_gguf(vocab_dir, tmp_path_factory):
    """`from_gguf(fam, d)`: transformers' tokenizer rebuilt from llama.cpp's vocabulary-only GGUF, saved in `d`.

    The rebuild parses the GGUF in Python: about 18 s for each 128k-152k vocabulary, seconds for the others. Its
    result is kept beside the vectors (where `make setup` put them), under a name that holds the GGUF's sha256 and
    the transformers and tokenizers versions, so a machine rebuilds each family once, and again only when one of
    those changes; where that directory is not writable, once per module."""
    import hashlib
    import os
    import shutil

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    built: dict[str, Path] = {}

    def rebuilt(fam: str) -> Path:
        gguf = vocab_dir / f"ggml-vocab-{fam}.gguf"
        tag = hashlib.sha256(f"{hashlib.sha256(gguf.read_bytes()).hexdigest()} {transformers.__version__} "
                             f"{tokenizers.__version__}".encode()).hexdigest()[:16]
        kept = vocab_dir / f"hf-{fam}-{tag}"
        if (kept / "tokenizer.json").is_file():
            return kept
        d = tmp_path_factory.mktemp(f"hf-{fam}")
        AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file=gguf.name).save_pretrained(d)
        if os.access(vocab_dir, os.W_OK):
            part = vocab_dir / f".{kept.name}-{os.getpid()}"
            shutil.copytree(d, part)
            try:
                part.rename(kept)  # whole or not at all; another process's copy may have landed first
            except OSError:
                shutil.rmtree(part, ignore_errors=True)
        return d

    def save(fam: str, d: Path) -> Path:
        if fam not in built:
            built[fam] = rebuilt(fam)
        shutil.copytree(built[fam], d)
        return d

    return save


def model_dir(from_gguf, fam: str, d: Path):
    """A tiny random-weight Llama with the family's tokenizer; returns (dir, transformers tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from_gguf(fam, d)
    tj = d / "tokenizer.json"
    tj.write_text(json.dumps(as_real_model(json.loads(tj.read_text()), fam)), encoding="utf-8")
    # transformers 5 rebuilds a class's own pipeline: the class the real model names, or tokenizer.json as is
    cls = {"starcoder": "PreTrainedTokenizerFast", "qwen35": "Qwen3_5Tokenizer"}.get(fam)
    if cls:  # GPT2Tokenizer would drop Digits, Qwen2Tokenizer would put back the Qwen2 regex
        tc = d / "tokenizer_config.json"
        tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": cls}))
    tok = AutoTokenizer.from_pretrained(str(d))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d, tok


# family -> (tokenizer.ggml.model, tokenizer.ggml.pre)
FAMILIES = {
    "gpt-2": ("gpt2", "gpt-2"),
    "llama-spm": ("llama", "default"),
    "starcoder": ("gpt2", "starcoder"),
    "llama-bpe": ("gpt2", "llama-bpe"),
    "qwen2": ("gpt2", "qwen2"),
    "qwen35": ("gpt2", "qwen35"),
    "phi-3": ("llama", "default"),
}
SPM = {"llama-spm", "phi-3"}
SLOW = {"llama-bpe", "qwen2", "qwen35"}  # 128k-152k vocabularies: transformers' GGUF rebuild alone takes ~20 s
NFC = {"qwen2", "qwen35"}  # Qwen2Tokenizer and Qwen3_5Tokenizer set an NFC normalizer


@pytest.mark.parametrize("fam", [pytest.param(f, marks=[pytest.mark.slow] if f in SLOW else []) for f in FAMILIES])
def test_family_tokenizes_like_llama_cpp_and_transformers(vocab_dir, from_gguf, tmp_path, fam):
    d, tok = model_dir(from_gguf, fam, tmp_path / "model")
    out = tmp_path / "model.gguf"
    gguf_export.write(d, out, {"id": fam})
    llama.lib()  # the appliance's llama_cpp, log captured; Llama directly: llama.load's header check parses
    from llama_cpp import Llama  # every merge in Python, seconds on a 128k vocabulary, and adds nothing here

    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    meta = llm.metadata
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == FAMILIES[fam]
    cases = vectors(vocab_dir, fam)
    ours = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t, _ in cases]
    theirs = [tok.encode(t, add_special_tokens=False) for t, _ in cases]
    bad = [t for (t, want), got in zip(cases, ours) if got != want]
    assert not bad, f"llama.cpp on our GGUF differs from {fam}.out on {bad[:3]}"
    # transformers' Qwen classes NFC-normalize, llama.cpp does not: the one accepted difference (pinned below)
    same = [i for i, (t, _) in enumerate(cases) if fam not in NFC or unicodedata.normalize("NFC", t) == t]
    assert [theirs[i] for i in same] == [cases[i][1] for i in same]
    # BOS/EOS as the tokenizer really adds them (llama.cpp's add_special applies add_bos/add_eos from the file)
    for text, _ in cases[:5]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tok.encode(text)
    if fam in NFC:  # the one accepted difference: llama.cpp does not NFC-normalize decomposed accents
        assert llm.tokenize("e\u0301".encode(), add_bos=False) != tok.encode("e\u0301", add_special_tokens=False)
        assert llm.tokenize("\u00e9".encode(), add_bos=False) == tok.encode("e\u0301", add_special_tokens=False)
    assert meta["tokenizer.ggml.add_bos_token"] == ("true" if fam in SPM else "false")
    if fam in SPM:  # SentencePiece: scores, 256 BYTE tokens, <unk> typed UNKNOWN, a space prefix
        types = list(GGUFReader(out).fields["tokenizer.ggml.token_type"].contents())
        assert types.count(gguf_vocab.BYTE) == 256 and types[tok.unk_token_id] == gguf_vocab.UNKNOWN
        assert meta["tokenizer.ggml.add_space_prefix"] == "true"


def spec_with(pre=None, normalizer=None, model=None) -> dict:
    base = {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]], "byte_fallback": False}
    return {"model": {**base, **(model or {})}, "pre_tokenizer": pre, "normalizer": normalizer,
            "decoder": {"type": "ByteLevel"}}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


@pytest.mark.parametrize("spec, why", [
    (spec_with(model={"type": "WordPiece"}), "WordPiece"),
    (spec_with(model={"type": "Unigram"}), "Unigram"),
    (spec_with({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated", "invert": False},
        BYTE_LEVEL]}), "matches none llama.cpp knows"),
    (spec_with({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}), "has no llama.cpp equivalent"),
    (spec_with({"type": "Whitespace"}), "has no llama.cpp equivalent"),
    (spec_with({"type": "ByteLevel", "use_regex": True}, {"type": "Lowercase"}), "normalizer"),
    (spec_with({"type": "Sequence", "pretokenizers": [  # Llama 3's split without its ignore_merges
        {"type": "Split", "pattern": {"Regex": gguf_vocab._LLAMA3}, "behavior": "Isolated", "invert": False},
        BYTE_LEVEL]}), "ignore_merges"),
    (spec_with(model={"byte_fallback": True}), "lacks byte tokens"),
    (spec_with({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
               model={"byte_fallback": True, "vocab": {f"<0x{b:02X}>": b for b in range(256)}}), "Metaspace"),
])
def test_unknown_families_are_refused_in_one_line(spec, why):
    with pytest.raises(QuantizeError) as e:
        gguf_vocab.family(spec)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_refusal_writes_nothing(from_gguf, tmp_path):
    """A real WordPiece (BERT) vocabulary beside a model: plan() refuses before any file is written."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d, _ = model_dir(from_gguf, "llama-spm", tmp_path / "model")
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.save(str(d / "tokenizer.json"))
    out = tmp_path / "model.gguf"
    with pytest.raises(QuantizeError, match="WordPiece"):
        gguf_export.write(d, out, {"id": "wp"})
    assert not out.exists()


def _tiny_llama(d: Path, n_vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)


def _gguf_tokenizes_as(d: Path, tok, texts: list[str], out: Path):
    """Export `d` to f32 and return llama.cpp's tokenizer on it, after checking it agrees with `tok` on texts."""
    gguf_export.write(d, out, {"id": d.name})
    llama.lib()
    from llama_cpp import Llama

    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    bad = [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
           != tok.encode(t, add_special_tokens=False)]
    assert not bad, f"llama.cpp on our GGUF differs from transformers on {bad[:3]}"
    return llm


def test_import_rewrites_a_metaspace_tokenizer_as_sentencepiece_runs_it(vocab_dir, from_gguf, tmp_path):
    """transformers 5 runs every LlamaTokenizer with Metaspace, which drops SentencePiece's ▁ before text that
    starts with a space; import rewrites it, and then transformers, llama.cpp and SentencePiece itself (the
    `.out` vectors) agree on every line."""
    from transformers import AutoTokenizer

    from appliance.train.bases import as_sentencepiece

    cases = vectors(vocab_dir, "llama-spm")
    d = from_gguf("llama-spm", tmp_path / "llama2")
    tc = d / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "LlamaTokenizer"}))
    before = AutoTokenizer.from_pretrained(str(d))
    assert json.loads(before.backend_tokenizer.to_str())["pre_tokenizer"]["type"] == "Metaspace"
    differs = [t for t, want in cases if before.encode(t, add_special_tokens=False) != want]
    assert differs and all(t.startswith(" ") for t in differs)  # what import fixes: text after a space
    with pytest.raises(QuantizeError, match="Metaspace"):
        gguf_vocab.family(json.loads(before.backend_tokenizer.to_str()))

    assert "Metaspace" in as_sentencepiece(d)
    assert as_sentencepiece(d) is None  # once is enough
    after = AutoTokenizer.from_pretrained(str(d))
    assert [after.encode(t, add_special_tokens=False) for t, _ in cases] == [want for _, want in cases]
    assert after.encode("a")[0] == after.bos_token_id
    assert after.decode(after.encode(" a b"), skip_special_tokens=True) == " a b"
    _tiny_llama(d, len(after))
    llm = _gguf_tokenizes_as(d, after, [t for t, _ in cases], tmp_path / "llama2.gguf")
    assert [llm.tokenize(t.encode(), add_bos=False, special=False) for t, _ in cases] == [w for _, w in cases]


def test_gemma_sentencepiece_without_a_space_prefix(vocab_dir, from_gguf, tmp_path):
    """Gemma's tokenizer: spaces become ▁ with no dummy prefix (llama.cpp's add_space_prefix false). transformers'
    own GemmaTokenizer pipeline, on llama.cpp's llama-spm vocabulary, against llama.cpp on every test line."""
    from transformers import AutoTokenizer

    d = from_gguf("llama-spm", tmp_path / "gemma")
    tc = d / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "GemmaTokenizer",
                              "pad_token": "<unk>", "mask_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(d))
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert spec["normalizer"]["type"] == "Replace" and spec["pre_tokenizer"]["type"] == "Split"
    assert gguf_vocab.family(spec) == ("llama", "default", False)
    _tiny_llama(d, len(tok))
    texts = [t for t, _ in vectors(vocab_dir, "llama-spm")]
    llm = _gguf_tokenizes_as(d, tok, texts, tmp_path / "gemma.gguf")
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == "false"
    assert tok.encode(" a", add_special_tokens=False) != tok.encode("a", add_special_tokens=False)
