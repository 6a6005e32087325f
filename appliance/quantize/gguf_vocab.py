"""tokenizer.json -> GGUF tokenizer metadata: recognise the family, or refuse with what is missing.

llama.cpp does not run a tokenizer.json: it has a fixed set of tokenizers (`tokenizer.ggml.model`) and of
pre-tokenizers (`tokenizer.ggml.pre`, each a hard-coded split regex). A GGUF tokenizes like its source only
when the family is named exactly, so each family here is recognised by the structure of the pipeline
transformers runs (model type, pre-tokenizer, normalizer, decoder, byte fallback, ignore_merges) and
anything else is refused in one line:

- byte-level BPE (`gpt2`): `ByteLevel` with the GPT-2 regex (`gpt-2`), `Digits` + `ByteLevel`
  (`starcoder`), or a `Split` whose regex is one llama.cpp copied from a tokenizer.json (`llama-bpe`,
  `qwen2`, `qwen35`, `tekken`, `gpt-4o`), followed by `ByteLevel` without its own regex. An NFC normalizer
  (transformers' Qwen classes) is the one accepted difference: llama.cpp does not normalize, so only text
  that is not already NFC (decomposed accents) tokenizes differently.
- SentencePiece-style BPE (`llama`): byte fallback with all 256 `<0xNN>` tokens, spaces as `▁` by the
  `Prepend`+`Replace` normalizer (SentencePiece's dummy prefix: Llama 2, Mistral 7B, Phi-3) or by `Replace`
  alone (Gemma: no prefix); scores recreate the merge order. The `Metaspace` form transformers 5 builds for
  `LlamaTokenizer` is refused here: it adds no `▁` before text that starts with a space, llama.cpp does.
  `appliance train import` rewrites it to the `Prepend` form (`train.bases.sentencepiece_form`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.quantize.types import QuantizeError

# llama.cpp token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The original tokenizer.json regexes llama.cpp quotes beside its own (llama-vocab.cpp) -> its pre-tokenizer
SPLITS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _QWEN35: "qwen35", _TEKKEN: "tekken", _GPT4O: "gpt-4o"}
# pre-tokenizers for which llama.cpp first looks a whole word up in the vocabulary (ignore_merges)
IGNORE_MERGES = {"llama-bpe", "tekken", "gpt-4o"}
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_GEMMA_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
_HINT = "GGUF export handles byte-level BPE (GPT-2, Llama 3, Qwen2, StarCoder splits) and SentencePiece-style BPE"


def read_vocab(model_dir: Path, n_vocab: int) -> dict:
    """Tokens, types, scores, merges, special ids and the llama.cpp tokenizer names of the model's tokenizer.

    The tokenizer is read as transformers loads it (AutoTokenizer, as training and the quality check do):
    a tokenizer class may rebuild parts of tokenizer.json's pipeline, and the GGUF must match what runs.
    """
    if not (model_dir / "tokenizer.json").is_file():
        raise QuantizeError(f"{model_dir} has no tokenizer.json",
                            "a GGUF carries its tokenizer: save the tokenizer beside the model")
    hf = _load(model_dir)
    spec = json.loads(hf.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    kind, pre, space_prefix = family(spec)
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: s for s, i in vocab.items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    if by_id and max(by_id) >= n_vocab:
        raise QuantizeError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {n_vocab}",
                            "the tokenizer does not belong to this model")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    unk = model.get("unk_token") or hf.unk_token
    tokens, types = _tokens(by_id, added, n_vocab, kind, unk)
    ids = {t: i for i, t in enumerate(tokens)}

    def special(tok: str | None) -> int | None:
        return ids.get(tok) if tok else None

    bos, eos = special(hf.bos_token), special(hf.eos_token)
    probe = hf.encode("a")  # what the tokenizer really adds around text
    return {"model": kind, "pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "scores": _scores(tokens, merges) if kind == "llama" else None, "add_space_prefix": space_prefix,
            "bos": bos, "eos": eos, "pad": special(hf.pad_token), "unk": special(unk),
            "eot": next((ids[t] for t in EOT_TOKENS if t in ids), None),
            "add_bos": bool(probe) and bos is not None and probe[0] == bos,
            "add_eos": len(probe) > 1 and eos is not None and probe[-1] == eos,
            "chat_template": _template(model_dir, hf)}


def _load(model_dir: Path):
    from transformers import AutoTokenizer  # ~2 s; export pays it once

    try:
        hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise QuantizeError(f"transformers cannot load the tokenizer in {model_dir} ({str(e)[:120]})",
                            "re-save the tokenizer with save_pretrained") from e
    if not getattr(hf, "backend_tokenizer", None):
        raise QuantizeError(f"the tokenizer in {model_dir} has no tokenizer.json pipeline (a slow tokenizer)",
                            "save a fast tokenizer (tokenizer.json) beside the model")
    return hf


def family(spec: dict) -> tuple[str, str, bool]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre, add_space_prefix) for a tokenizer.json, or QuantizeError."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        what = {"Unigram": "Unigram (T5-style SentencePiece: llama.cpp needs the SentencePiece model's charsmap)",
                "WordPiece": "WordPiece (BERT-style: an encoder vocabulary, no llama.cpp decoder equivalent)",
                "WordLevel": "WordLevel"}.get(model.get("type"), repr(model.get("type")))
        raise QuantizeError(f"tokenizer model {what} is not supported", _HINT)
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise QuantizeError("BPE with a subword prefix or word suffix has no llama.cpp equivalent", _HINT)
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if model.get("byte_fallback"):
        return "llama", "default", _sentencepiece(pre, norm, model)
    name = _byte_level_pre(pre)
    if norm is not None and norm.get("type") != "NFC":  # Qwen2 declares NFC; llama.cpp does not normalize
        raise QuantizeError(f"normalizer {_short(norm)} has no llama.cpp equivalent", _HINT)
    if bool(model.get("ignore_merges")) != (name in IGNORE_MERGES):
        raise QuantizeError(f"BPE ignore_merges={bool(model.get('ignore_merges'))} differs from llama.cpp's "
                            f"{name!r} pre-tokenizer ({name in IGNORE_MERGES})", _HINT)
    if "ByteLevel" not in _types(spec.get("decoder")):
        raise QuantizeError(f"decoder {_short(spec.get('decoder'))} is not byte-level", _HINT)
    return "gpt2", name, False


def _byte_level_pre(pre: dict | None) -> str:
    """The llama.cpp pre-tokenizer whose split rules equal this byte-level BPE's; refuse what has none."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
            return "starcoder"  # one digit at a time, then the GPT-2 regex (StarCoder, SmolLM, Refact)
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
            split = steps[0]
            regex = (split.get("pattern") or {}).get("Regex")
            if regex in SPLITS and split.get("behavior") == "Isolated" and not split.get("invert"):
                return SPLITS[regex]
            raise QuantizeError(f"pre-tokenizer split regex {regex!r:.80} matches none llama.cpp knows "
                                f"({', '.join(SPLITS.values())})", _HINT)
    raise QuantizeError(f"pre-tokenizer {_short(pre)} has no llama.cpp equivalent", _HINT)


def _sentencepiece(pre: dict | None, norm: dict | None, model: dict) -> bool:
    """Checks a byte-fallback BPE is SentencePiece-shaped; returns whether a space is prepended."""
    vocab = model.get("vocab") or {}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise QuantizeError(f"byte-fallback BPE lacks byte tokens ({', '.join(missing[:3])}, ...)", _HINT)
    if model.get("ignore_merges"):
        raise QuantizeError("SentencePiece-style BPE with ignore_merges has no llama.cpp equivalent", _HINT)
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    shape = [(s.get("type"), s.get("prepend"), (s.get("pattern") or {}).get("String"), s.get("content"))
             for s in steps]
    no_split = pre is None or pre == _GEMMA_SPLIT  # Gemma's split on " " finds none: the normalizer replaced them
    if no_split and shape == [("Prepend", "▁", None, None), ("Replace", None, " ", "▁")]:
        return True  # Llama 2's form: SentencePiece's dummy prefix, as llama.cpp's add_space_prefix
    if no_split and shape == [("Replace", None, " ", "▁")]:
        return False  # Gemma's: spaces become ▁, no dummy prefix
    if pre and pre.get("type") == "Metaspace":
        raise QuantizeError("a Metaspace pre-tokenizer adds no ▁ to text that starts with a space, SentencePiece "
                            "and llama.cpp do: such text would tokenize differently",
                            "import the base with `appliance train import`, which writes its tokenizer as "
                            "SentencePiece runs it")
    raise QuantizeError(f"byte-fallback BPE with normalizer {_short(norm)} and pre-tokenizer {_short(pre)} "
                        "is not SentencePiece-shaped", _HINT)


def _tokens(by_id: dict[int, str], added: dict[int, dict], n_vocab: int, kind: str,
            unk: str | None) -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")  # rows the model pads its vocabulary with; never produced
            types.append(UNUSED)
        elif i in added and tok != unk:
            tokens.append(tok)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(tok)
            is_byte = kind == "llama" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")
            types.append(UNKNOWN if tok == unk else BYTE if is_byte else NORMAL)
    return tokens, types


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece merges the adjacent pair whose joined token scores highest: score = -(merge rank).

    Tokens no merge produces get a score below every merge, so llama.cpp prefers any real merge first.
    """
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) <= 1 else floor) for t in tokens]


def _template(model_dir: Path, hf) -> str | None:
    template = getattr(hf, "chat_template", None)
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if isinstance(template, dict):  # several named templates: llama.cpp takes one
        template = template.get("default")
    return template if isinstance(template, str) else None


def write_metadata(wr: Any, v: dict) -> None:
    """The tokenizer keys of a GGUF, on a `gguf.GGUFWriter` in its key/value phase."""
    wr.add_tokenizer_model(v["model"])
    wr.add_tokenizer_pre(v["pre"])
    wr.add_token_list(v["tokens"])
    wr.add_token_types(v["types"])
    if v["scores"] is not None:
        wr.add_token_scores(v["scores"])
    if v["merges"] and v["model"] == "gpt2":
        wr.add_token_merges(v["merges"])
    if v["model"] == "llama":
        wr.add_add_space_prefix(v["add_space_prefix"])
    for key, fn in (("bos", wr.add_bos_token_id), ("eos", wr.add_eos_token_id), ("pad", wr.add_pad_token_id),
                    ("eot", wr.add_eot_token_id), ("unk", wr.add_unk_token_id)):
        if v.get(key) is not None:
            fn(v[key])
    wr.add_add_bos_token(v["add_bos"])
    wr.add_add_eos_token(v["add_eos"])
    if v["chat_template"]:
        wr.add_chat_template(v["chat_template"])


def _types(node: dict | None) -> list[str]:
    if not node:
        return []
    inner = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers") or []
    return [node.get("type", "")] + [t for s in inner for t in _types(s)]


def _short(node: Any) -> str:
    return json.dumps(node)[:120]
