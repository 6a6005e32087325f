"""Bases a site brings (Llama 3, Mistral, Qwen 2.5/3, Gemma 2, Phi-3, ...): what `train import` accepts,
what it records about the source, which layers LoRA adapts, and the chat template a base without one gets.

Accepted: a local transformers directory of an architecture transformers implements itself (no code that
comes with the model), weights in safetensors (one file or shards listed in model.safetensors.index.json)
in fp32, bf16 or fp16. Pickle weights (*.bin, *.pt, ...) and custom code are refused before anything is
copied. No torch here: the checks read JSON and safetensors headers only.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

from appliance import sealed
from appliance.errors import UsageError
from appliance.home import file_sha256

# Causal-LM classes transformers implements itself; the appliance's own models are Llama and Mixtral.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # fast (BPE) or SentencePiece; either one
WEIGHT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX = "model.safetensors.index.json"

# LoRA targets when the recipe names none: every linear layer of attention and MLP. Phi-3 fuses q/k/v and
# gate/up into one matrix each.
_SEPARATE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {"Phi3ForCausalLM": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def lora_targets(architectures: list[str] | None, present: set[str]) -> list[str]:
    """The default LoRA targets for an architecture, those of them the model has (Mixtral's experts use
    w1/w2/w3, so attention alone there)."""
    arch = (architectures or [""])[0]
    return [t for t in LORA_TARGETS.get(arch, _SEPARATE) if t in present]


def check_model_dir(src: Path) -> dict:
    """What `appliance train import` accepts; its config.json. Every refusal is one line, before any copy."""
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory", "point at a local transformers model directory")
    if sealed.is_sealed(src):  # a model made here: its files are sealed, and it is a base as it is
        raise UsageError(f"{src} is a sealed artifact, not a model directory",
                         "train on it by its id (--model.base NAME@K), or `appliance model export` a plain copy")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    if code := [p.name for p in files if p.suffix == ".py"]:
        raise UsageError(f"{src} ships code ({', '.join(code[:3])}): refused",
                         "the appliance runs no code that comes with a model; use a built-in architecture")
    if pickled := [p.name for p in files if p.suffix in PICKLE_SUFFIXES]:
        raise UsageError(f"{src} has pickle weights ({', '.join(pickled[:3])}), which can run code when loaded: "
                         "refused", "convert them to safetensors on a trusted machine, or take the safetensors "
                                    "release of the model")
    config = _json(src / "config.json")
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (src / f).exists()]
    if not any((src / f).exists() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if not list(src.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise UsageError(f"{src} is not a complete model directory: missing {', '.join(missing)}",
                         "it needs config.json, safetensors weights and a tokenizer")
    _refuse_custom_code(src, config)
    arch = config.get("architectures") or []
    if not arch or arch[0] not in ARCHITECTURES:
        raise UsageError(f"{src}: architecture {arch[0] if arch else '(none in config.json)'} is not supported",
                         f"import one of {', '.join(ARCHITECTURES)}")
    weight_dtypes(src)  # refuses missing shards and quantized weights
    return config


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON: {e}", "fix or re-export the model") from None
    return doc if isinstance(doc, dict) else {}


def _refuse_custom_code(src: Path, config: dict) -> None:
    for name in ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json"):
        doc = config if name == "config.json" else _json(src / name)
        if doc.get("auto_map") or doc.get("trust_remote_code"):
            why = "auto_map" if doc.get("auto_map") else "trust_remote_code"
            raise UsageError(f"{src} needs custom code ({why} in {name})",
                             "the appliance runs no code that comes with a model; use a built-in architecture")


def shards(src: Path) -> list[Path]:
    """The safetensors files that hold the weights: those the index lists, else model.safetensors or every one."""
    index = src / INDEX
    if index.is_file():
        names = sorted(set(_json(index).get("weight_map", {}).values()))
        if gone := [n for n in names if not (src / n).is_file()]:
            raise UsageError(f"{src}: {INDEX} lists shards that are missing: {', '.join(gone[:3])}",
                             "copy the whole model directory")
        return [src / n for n in names]
    one = src / "model.safetensors"
    return [one] if one.is_file() else sorted(src.glob("*.safetensors"))


def weight_dtypes(src: Path) -> list[str]:
    """The tensors' dtypes over every shard, read from the safetensors headers; quantized ones are refused."""
    seen: set[str] = set()
    for path in shards(src):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise UsageError(f"{path} is not a safetensors file: {e}", "copy the whole model directory") from None
        seen |= {t["dtype"] for k, t in header.items() if k != "__metadata__"}
    if odd := sorted(seen - set(WEIGHT_DTYPES)):
        raise UsageError(f"{src} holds {', '.join(odd)} weights (quantized?): refused",
                         "import the full-precision (bf16, fp16 or fp32) release; the appliance quantizes itself")
    return sorted(WEIGHT_DTYPES[d] for d in seen)


def source_record(src: Path, config: dict) -> dict:
    """What lineage keeps about an imported base: architecture, dtype, name and revision where the directory
    says them, and every file's sha256."""
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    name, revision = _name_and_revision(src, config)
    return {"format": "transformers", "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"),
            "dtype": config.get("dtype") or config.get("torch_dtype"), "weight_dtypes": weight_dtypes(src),
            "name": name, "revision": revision, "transformers_version": config.get("transformers_version"),
            "sharded": (src / INDEX).is_file(), "files": {p.name: file_sha256(p) for p in files}}


def _name_and_revision(src: Path, config: dict) -> tuple[str | None, str | None]:
    """From config.json (`_name_or_path`, `_commit_hash`), the README's front matter, generation_config.json,
    or a hub cache path (models--ORG--NAME/snapshots/REVISION)."""
    gen = _json(src / "generation_config.json")
    front = _front_matter(src / "README.md")
    name = next((v for v in (config.get("_name_or_path"), front.get("model_name"), front.get("base_model"),
                             gen.get("_name_or_path")) if isinstance(v, str) and v and v != str(src)), None)
    revision = next((v for v in (config.get("_commit_hash"), front.get("revision"), gen.get("_commit_hash"))
                     if isinstance(v, str) and v), None)
    if src.parent.name == "snapshots" and src.parent.parent.name.startswith("models--"):
        name = name or src.parent.parent.name[len("models--"):].replace("--", "/")
        revision = revision or src.name
    return name, revision


def _front_matter(path: Path) -> dict:
    """Simple `key: value` lines of a model card's YAML front matter (no YAML library needed)."""
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    m = re.match(r"---\n(.*?)\n---", text, re.S)
    out: dict = {}
    for line in (m.group(1).splitlines() if m else []):
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith((" ", "-")) and value.strip():
            out[key.strip()] = value.strip().strip("'\"")
    return out


# SentencePiece's own rule, as llama.cpp's `llama` tokenizer runs it: spaces become ▁ and, with its dummy
# prefix, one ▁ starts every stretch of text (also one that already starts with a space).
_SPM_PREPEND = {"type": "Prepend", "prepend": "\u2581"}
_SPM_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
BACKEND_CLASS = "TokenizersBackend"  # transformers runs tokenizer.json as written, rebuilding nothing


def sentencepiece_form(spec: dict) -> dict | None:
    """tokenizer.json as SentencePiece tokenizes, for a byte-fallback BPE that transformers runs with a
    `Metaspace` pre-tokenizer; None when it has another shape (nothing to change).

    transformers 5 builds every `LlamaTokenizer` (Llama 2, Mistral 7B, Phi-3, ...) with `Metaspace`, which
    adds no ▁ before text that already starts with a space: " hello" gives `▁hello`, where SentencePiece,
    which these models were trained with, and llama.cpp give `▁` `▁hello`. Written as SentencePiece's dummy
    prefix (a `Prepend` normalizer), training, the GGUF and the original model tokenize alike.
    """
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and spec.get("normalizer") is None
            and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581"
            and not pre.get("split") and pre.get("prepend_scheme") in ("first", "always", "never")):
        return None
    prefix = [] if pre["prepend_scheme"] == "never" else [_SPM_PREPEND]
    # added tokens are matched in the raw text, as in Llama 2's tokenizer.json: a normalized one would get the
    # ▁ prefix too and then match only after a space
    added = [{**t, "normalized": False} for t in spec.get("added_tokens", [])]
    return {**spec, "pre_tokenizer": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [*prefix, _SPM_REPLACE]}}


def as_sentencepiece(model_dir: Path, new: Callable[[str], object] | None = None) -> str | None:
    """Rewrite the tokenizer in `model_dir` (a copy being imported) to `sentencepiece_form`, run as written;
    returns what was done, for the import's output and lineage, or None when it already tokenizes so. `new(name)`
    makes a file the rewrite adds (an in-memory one, when `model_dir` is a `MemDir`)."""
    from transformers import AutoTokenizer

    def load_tokenizer(d: Path):
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)

    tok = load_tokenizer(model_dir)
    spec = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "backend_tokenizer", None) else {}
    fixed = sentencepiece_form(spec)
    if fixed is None:
        return None
    before = tok.encode(" a", add_special_tokens=False)
    (model_dir / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False), encoding="utf-8")
    config = _json(model_dir / "tokenizer_config.json")
    was = config.get("tokenizer_class")
    if new is not None and not (model_dir / "tokenizer_config.json").exists():
        new("tokenizer_config.json")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": BACKEND_CLASS},
                                                                indent=2, ensure_ascii=False))
    after = load_tokenizer(model_dir)
    if json.loads(after.backend_tokenizer.to_str()).get("normalizer") != fixed["normalizer"]:
        raise UsageError(f"the tokenizer in {model_dir} could not be rewritten as SentencePiece runs it",
                         "save it with tokenizer_class TokenizersBackend and a Prepend/Replace normalizer")
    return (f"tokenizer rewritten as SentencePiece runs it ({was or 'its class'} under transformers used a "
            f"Metaspace pre-tokenizer: ' a' was {before}, now {after.encode(' a', add_special_tokens=False)}; text "
            "after a special token now starts with ▁, as in llama.cpp)")


def chat_template_for(tokenizer) -> tuple[str, str] | None:
    """None when the tokenizer has its own chat template; else (template, why) for the appliance's ChatML.

    Where `<|im_end|>` is one token (the appliance's tokenizers, Qwen's) the template is the appliance's
    ChatML exactly; otherwise a turn ends with the tokenizer's own EOS, so every runtime stops the answer
    there (a `<|im_end|>` spelled in several pieces is a stop no runtime sees).
    """
    from appliance.train.tokenizer import CHAT_TEMPLATE, IM_END

    if getattr(tokenizer, "chat_template", None):
        return None
    end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        return CHAT_TEMPLATE, "ChatML"
    return CHAT_TEMPLATE.replace("'<|im_end|>'", "eos_token"), "ChatML, turns ending with EOS"


def ensure_chat_template(tokenizer) -> str | None:
    """Give a tokenizer without a chat template the appliance's; returns what was set (None: it had one)."""
    picked = chat_template_for(tokenizer)
    if picked is None:
        return None
    tokenizer.chat_template = picked[0]
    return picked[1]
