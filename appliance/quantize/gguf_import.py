"""GGUF -> transformers model directory: the exporter's mapping run backwards, then proven against llama.cpp.

A site may hold a base model only as a GGUF. `appliance train import FILE.gguf` dequantizes it into a plain
transformers directory (config.json, f32 safetensors, tokenizer.json) that training takes like any import.
transformers' own GGUF loader is not used: it loses Llama 3's RoPE scaling, Qwen3's head size, Phi-3's
partial rotary and Gemma 2's soft-capping, and cannot load a Mistral GGUF at all; each of these loads and
computes something else. Here every family is the inverse of `gguf_arch` (Q/K rows un-permuted, Gemma's +1
taken off norms, `rope_freqs` turned back into llama3 RoPE parameters), and the result is checked before it
is accepted:
- the tokenizer: transformers' tokenizer built from the GGUF (with the fixes its rebuild needs) must
  tokenize the hard strings (`quality.HARD_STRINGS`, special tokens in text) exactly as llama.cpp does on
  the source file;
- the weights: the new model's logits on a probe sequence against llama.cpp's on the source file. A float
  source (f32/f16/bf16 matrices) must agree on every next token with max |logit diff| < 1e-2; a quantized
  source is dequantized exactly, but llama.cpp also rounds activations, so the figures are reported and
  only a mapping error (top-1 agreement below 0.9) refuses.
Mixture-of-experts GGUFs, RoPE scaling other than none/llama3 and arches outside `gguf_arch` are refused in
one line before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from appliance.memfiles import MemDir, MemFile
from appliance.quantize import gguf_arch
from appliance.quantize.gguf_vocab import IGNORE_MERGES
from appliance.quantize.types import QuantizeError

# llama.cpp arch -> the transformers model_type it becomes (`llama` also holds Mistral: same computation)
ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2"}
FLOAT_TYPES = {"F32", "F16", "BF16"}
SHARD_BYTES = 2 << 30
PROBE = ("The pump house log, 14 March: valve V-203 was closed at 06:40 and the crew checked the seals. "
         "Pressure held at 3.5 bar; no leaks were found. Shift B reported a torque of 42 Nm on flange 7, "
         "below the 45 Nm the manual asks for, and re-tightened it.\n\n") * 4  # ~160 tokens: past short windows


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


class _Meta:
    """A GGUF's key/value fields, read by name (per-arch keys with the arch prefix)."""

    def __init__(self, reader, arch: str):
        self.r, self.arch = reader, arch

    def get(self, key: str, default=None):
        fld = self.r.fields.get(key) or self.r.fields.get(f"{self.arch}.{key}")
        return fld.contents() if fld is not None else default

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise QuantizeError(f"the GGUF has no {self.arch}.{key}", "it is not a complete model file")
        return value


def read(path: Path):
    """(reader, arch, family) of a model GGUF, refusing what cannot become a transformers model."""
    from appliance.quantize.llama import check

    r = check(path)["reader"]
    arch = str(r.fields["general.architecture"].contents()) if "general.architecture" in r.fields else "?"
    if arch not in ARCHES:
        raise QuantizeError(f"GGUF architecture {arch!r} cannot be imported",
                            f"import a GGUF of arch {', '.join(ARCHES)}, or the model's transformers directory")
    if not r.tensors:
        raise QuantizeError(f"{path.name} holds a vocabulary only, no weights", "import a model GGUF")
    meta = _Meta(r, arch)
    if meta.get("expert_count"):
        raise QuantizeError("a mixture-of-experts GGUF cannot be imported", "import its transformers directory")
    scaling = meta.get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise QuantizeError(f"GGUF RoPE scaling {scaling!r} cannot be imported", "import its transformers directory")
    # settings llama.cpp applies (a scaling factor with no type is linear there) that the import would drop
    for key in ("rope.scaling.factor", "rope.scale_linear", "rope.scaling.attn_factor"):
        if meta.get(key) not in (None, 0, 0.0, 1, 1.0):
            raise QuantizeError(f"GGUF {arch}.{key} = {meta.get(key)} cannot be imported",
                                "import its transformers directory")
    if meta.get("rope.freq_base_swa") is not None:
        raise QuantizeError(f"GGUF {arch}.rope.freq_base_swa cannot be imported", "import its transformers directory")
    heads, kv = meta.get("attention.head_count"), meta.get("attention.head_count_kv")
    if not isinstance(heads, int) or heads <= 0 or (kv is not None and (not isinstance(kv, int) or kv <= 0
                                                                         or heads % kv)):
        raise QuantizeError(f"GGUF attention heads {heads} / KV heads {kv} do not divide", "the file is corrupt")
    key_len, value_len = meta.get("attention.key_length"), meta.get("attention.value_length")
    if value_len is not None and value_len != key_len:
        raise QuantizeError(f"GGUF value length {value_len} differs from key length {key_len}",
                            "import its transformers directory")
    hd = key_len or (meta.get("embedding_length") or 0) // heads
    rot = meta.get("rope.dimension_count")
    if rot is not None and arch != "phi3" and rot != hd:
        raise QuantizeError(f"GGUF rotates {rot} of {hd} head dimensions; only phi3 rotates part",
                            "import its transformers directory")
    return r, arch, gguf_arch.FAMILIES[ARCHES[arch]]


def config(r, arch: str, fam: gguf_arch.Family, tensors: dict) -> dict:
    """The transformers config of the GGUF's model (kwargs for the family's config class)."""
    from gguf.quants import dequantize

    m = _Meta(r, arch)
    hidden, heads = int(m.need("embedding_length")), int(m.need("attention.head_count"))
    hd = int(m.get("attention.key_length") or hidden // heads)
    cfg = {"model_type": fam.model_type, "architectures": [fam.hf_class], "hidden_size": hidden,
           "num_hidden_layers": int(m.need("block_count")), "intermediate_size": int(m.need("feed_forward_length")),
           "num_attention_heads": heads, "num_key_value_heads": int(m.get("attention.head_count_kv") or heads),
           "head_dim": hd, "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon") or 1e-6),
           "max_position_embeddings": int(m.get("context_length") or 2048),
           "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # ggml order
           "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": fam.act,
           "bos_token_id": m.get("tokenizer.ggml.bos_token_id"), "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
           "pad_token_id": m.get("tokenizer.ggml.padding_token_id")}
    rope = {"rope_type": "default", "rope_theta": float(m.get("rope.freq_base") or 10000.0)}
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        rope = llama3_rope(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).ravel(),
                           rope["rope_theta"], hd)
    if fam.model_type == "phi3":
        rope["partial_rotary_factor"] = int(m.get("rope.dimension_count") or hd) / hd
        cfg["original_max_position_embeddings"] = int(m.get("rope.scaling.original_context_length")
                                                      or cfg["max_position_embeddings"])
        del cfg["head_dim"]
    if fam.model_type == "qwen2":
        cfg["use_sliding_window"] = False
    if fam.model_type == "gemma2":
        window = m.get("attention.sliding_window")
        cfg.update(hidden_activation=fam.act, query_pre_attn_scalar=hidden // heads if cfg["num_hidden_layers"] == 46
                   else hd, sliding_window=int(4096 if window is None else window),  # llama.cpp's default
                   attn_logit_softcapping=float(m.need("attn_logit_softcapping")),
                   final_logit_softcapping=float(m.need("final_logit_softcapping")))
    cfg["rope_parameters"] = rope
    # token ids stay even when None: a config class's default (Phi-3's pad 32000) may lie outside the vocabulary
    return {k: v for k, v in cfg.items() if v is not None or k.endswith("_token_id")}


def llama3_rope(factors: np.ndarray, theta: float, dim: int) -> dict:
    """Llama 3 RoPE parameters that reproduce llama.cpp's `rope_freqs` divisors, or QuantizeError.

    Between the two wavelength bounds the divisor is 1/((1-s)/factor + s) with s linear in 1/wavelength;
    with low_freq_factor fixed at 1 (only the ratios to the original context matter) the rest follows from
    the smoothed band. Every candidate is checked by recomputing the divisors."""
    factor = float(factors.max())
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    x = inv / (2 * math.pi)  # 1 / wavelength
    band = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    s = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor) if factor > 1 else np.array([])
    candidates = []
    if band.sum() >= 2:
        a, b = np.polyfit(x[band], s, 1)  # s = old/(high-low) * x - low/(high-low)
        if b < 0:
            candidates.append((-a / b, 1.0 - 1.0 / b))
    for k in range(4, 25):
        old = float(2 ** k)
        high = (1.0 + (old * x[band][0] - 1.0) / s[0]) if band.any() and s[0] > 0 else 4.0
        candidates.append((old, high))
    for old, high in candidates:
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": float(high), "original_max_position_embeddings": int(round(old))}
        if high > 1.0 and np.allclose(gguf_arch.llama3_rope_factors(rope, dim), factors, rtol=1e-4, atol=1e-5):
            return rope
    raise QuantizeError("the GGUF's rope_freqs match no Llama 3 RoPE parameters", "import its transformers directory")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `gguf_arch.permute_qk`: llama.cpp's interleaved pairs back to halves per head."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _inverse(kind: str, n_head: int, n_kv: int):
    if kind == "q":
        return lambda a: unpermute_qk(a, n_head)
    if kind == "k":
        return lambda a: unpermute_qk(a, n_kv)
    if kind == "+1":
        return lambda a: a - np.float32(1.0)
    return lambda a: a


def _plan(cfg: dict, fam: gguf_arch.Family, tensors: dict) -> list:
    """(GGUF name, hf name, inverse transform) for every tensor; refuses unmapped or missing ones."""
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    plan = [("token_embd.weight", "model.embed_tokens.weight", lambda a: a),
            ("output_norm.weight", "model.norm.weight", _inverse(fam.global_shift, 0, 0))]
    if "output.weight" in tensors:
        plan.append(("output.weight", "lm_head.weight", lambda a: a))
    for i in range(cfg["num_hidden_layers"]):
        plan += [(f"blk.{i}.{g}", f"model.layers.{i}.{h}", _inverse(kind, n_head, n_kv)) for g, h, kind in fam.layer]
    wanted = {g for g, _, _ in plan} | {"rope_freqs.weight"}
    if extra := sorted(set(tensors) - wanted):
        raise QuantizeError(f"GGUF tensors with no {fam.hf_class} mapping ({', '.join(extra[:3])})",
                            "import its transformers directory")
    if missing := [g for g, _, _ in plan if g not in tensors]:
        raise QuantizeError(f"the GGUF lacks {', '.join(missing[:3])} for {fam.hf_class}", "the file is incomplete")
    return plan


def check_shapes(hf_cfg, r, cfg: dict, fam: gguf_arch.Family, tensors: dict) -> None:
    """Every tensor's shape against the model its config describes (built on the meta device), before a byte
    is written: a file whose shapes disagree with its own keys would otherwise only fail inside llama.cpp."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for g, h, _ in _plan(cfg, fam, tensors):
        got = tuple(int(n) for n in reversed(tensors[g].shape))
        if want.get(h) != got:
            raise QuantizeError(f"GGUF tensor {g} has shape {got}, its config says {want.get(h)}",
                                "the file is corrupt")


def weights(r, cfg: dict, fam: gguf_arch.Family, tensors: dict):
    """(hf name, f32 array) for every tensor, dequantized and mapped back; refuses unmapped or missing ones."""
    from gguf.quants import dequantize

    plan = _plan(cfg, fam, tensors)
    for g, h, inverse in plan:
        t = tensors[g]
        arr = dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        if not np.isfinite(arr).all():
            raise QuantizeError(f"GGUF tensor {g} holds NaN or Inf", "the file's weights are broken")
        yield h, np.ascontiguousarray(inverse(arr.astype(np.float32, copy=False)))


def _premake(mem: MemDir | None, names) -> None:
    """In-memory files for the names a library saves by path (it writes through their links)."""
    for name in names if mem else ():
        if name not in mem.files:
            mem.new(name)


def _drop_unwritten(mem: MemDir | None) -> None:
    """The links of premade files the library left empty: a loader would read them as broken files."""
    for name, f in list(mem.files.items()) if mem else ():
        if not f.size and os.path.lexists(mem.path / name):
            os.unlink(mem.path / name)
            mem.files.pop(name).close()


def tokenizer(path: Path, r, out: Path, chat_template: str | None, mem: MemDir | None = None):
    """transformers' tokenizer built from the GGUF, with what its rebuild gets wrong put right, saved in `out`
    (through in-memory files when `mem` is the directory)."""
    import os
    import tempfile

    from transformers import AutoTokenizer

    from appliance import sealed
    from appliance.train.bases import BACKEND_CLASS, sentencepiece_form

    try:
        # alone in a private directory: transformers would also read a tokenizer_config.json lying beside the file
        with tempfile.TemporaryDirectory(prefix="gguf-import-") as alone:
            os.symlink(path.resolve(), Path(alone) / "model.gguf")
            tok = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of transformers' converter is one line here
        raise QuantizeError(f"transformers cannot build a tokenizer from {path.name} ({str(e)[:120]})",
                            "import the model's transformers directory") from None
    spec = json.loads(tok.backend_tokenizer.to_str())
    meta = _Meta(r, "")
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre") or "default"
    if kind == "gpt2" and pre in IGNORE_MERGES:
        spec["model"]["ignore_merges"] = True  # llama.cpp looks whole words up first; transformers' rebuild does not
    if kind == "llama":
        spec = sentencepiece_form(spec) or spec
        if meta.get("tokenizer.ggml.add_space_prefix") is False and spec.get("normalizer"):
            steps = spec["normalizer"].get("normalizers", [spec["normalizer"]])
            spec["normalizer"] = {"type": "Sequence", "normalizers": [s for s in steps if s.get("type") != "Prepend"]}
    # a tokenizer class may add tokens of its own (GemmaTokenizer's <mask>): the GGUF's vocabulary is the truth
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < n_vocab]
    known = set(spec["model"].get("vocab", {})) | {t["content"] for t in spec["added_tokens"]}
    _premake(mem, sealed.TOKENIZER_FILES)
    tok.save_pretrained(str(out))
    _drop_unwritten(mem)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = BACKEND_CLASS
    for key in [k for k, v in tc.items() if k.endswith("_token") and isinstance(v, str) and v not in known]:
        del tc[key]
    if chat_template:
        tc["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def convert(path: Path, out: Path | MemDir, progress=lambda done, total: None) -> dict:
    """Write `path` (a model GGUF) as a transformers directory in `out` (empty; a `MemDir` keeps every file in
    memory, for an import into the home); returns the checks' figures."""
    from safetensors.numpy import save, save_file
    from transformers import AutoConfig

    mem = out if isinstance(out, MemDir) else None
    out = Path(mem.path) if mem else Path(out)
    r, arch, fam = read(path)
    tensors = {t.name: t for t in r.tensors}
    cfg = config(r, arch, fam, tensors)
    meta = _Meta(r, arch)
    types = sorted({t.tensor_type.name for t in r.tensors if len(t.shape) > 1})
    quantized = bool(set(types) - FLOAT_TYPES)
    kw = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    hf_cfg = AutoConfig.for_model(fam.model_type, **kw)
    hf_cfg.architectures = [fam.hf_class]
    check_shapes(hf_cfg, r, cfg, fam, tensors)
    total = sum(int(t.n_elements) for t in r.tensors) * 4
    free = _free_memory() if mem else shutil.disk_usage(out).free
    if total > free:
        room = "of memory" if mem else "on disk"
        raise QuantizeError(f"the model needs {total / 2**30:.1f} GiB as f32 and {free / 2**30:.1f} GiB {room} are "
                            "free", f"free {'memory' if mem else 'space in the home'}, then import again")
    _premake(mem, ("config.json", "generation_config.json"))
    hf_cfg.save_pretrained(str(out))
    _drop_unwritten(mem)
    shard, size, index, done = {}, 0, {}, 0
    files = []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            if mem:
                mem.add(name, MemFile.of(name, save(shard, metadata={"format": "pt"})))
            else:
                save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shard})
        shard, size = {}, 0

    for name, arr in weights(r, cfg, fam, tensors):
        if size and size + arr.nbytes > SHARD_BYTES:
            flush()
        shard[name] = arr
        size += arr.nbytes
        done += arr.nbytes
        progress(done, total)
    flush()
    if len(files) == 1:
        if mem:
            mem.rename(files[0], "model.safetensors")
        else:
            (out / files[0]).rename(out / "model.safetensors")
    else:
        _premake(mem, ("model.safetensors.index.json",))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": done}, "weight_map": index}, indent=2))
    tok = tokenizer(path, r, out, meta.get("tokenizer.chat_template"), mem)
    figures = verify(path, out, tok, quantized)
    return {"arch": arch, "architecture": fam.hf_class, "tensor_types": types, "quantized": quantized,
            "name": meta.get("general.name"), "rope": cfg["rope_parameters"].get("rope_type"), **figures}


def _free_memory() -> int:
    """Bytes of memory available now (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _llama_side(path: str, texts: list[str], probe: str, n_probe: int) -> dict:
    """In a child process: llama.cpp's tokens for `texts`, what it adds around text, and its logits on the
    probe. A file that makes llama.cpp abort takes the child down, not the import."""
    from appliance.quantize import llama

    try:
        llm = llama.load(Path(path), n_ctx=n_probe + 64, logits_all=True, threads=1, f32_cache=True)
        try:
            out = {"tokens": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts],
                   "with_specials": llm.tokenize(b"a", add_bos=True, special=False),
                   "plain": llm.tokenize(b"a", add_bos=False, special=False),
                   "ids": llm.tokenize(probe.encode("utf-8"), add_bos=False, special=False)[:n_probe]}
            llm.eval(out["ids"])
            out["scores"] = np.asarray(llm.scores[:len(out["ids"])], dtype=np.float32)
        finally:
            llm.close()
        return out
    except Exception as e:  # noqa: BLE001 - returned as one line to the parent
        return {"error": getattr(e, "message", None) or str(e).splitlines()[0][:200]}


def llama_cpp_side(path: Path, texts: list[str], probe: str, n_probe: int = 160) -> dict:
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    os.environ["GGML_NO_BACKTRACE"] = "1"  # an abort prints no debugger backtrace
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        try:
            got = ex.submit(_llama_side, str(path), texts, probe, n_probe).result()
        except cf.process.BrokenProcessPool:
            raise QuantizeError("llama.cpp aborted on the GGUF", "the file is corrupt, or not a model llama.cpp "
                                                               "runs: import its transformers directory") from None
    if "error" in got:
        raise QuantizeError(f"llama.cpp cannot run the GGUF: {got['error']}", "the file is corrupt")
    return got


def _match_specials(tok, out: Path, lc: dict):
    """Make the tokenizer add BOS/EOS around text exactly as llama.cpp does with this file (its add_bos and
    add_eos keys, or llama.cpp's defaults when absent); returns the tokenizer as saved."""
    from transformers import AutoTokenizer

    if tok("a")["input_ids"] == lc["with_specials"]:
        return tok
    plain, full = lc["plain"], lc["with_specials"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        raise QuantizeError("llama.cpp adds tokens inside text, not around it", "import its transformers directory")
    before, after = full[:at], full[at + len(plain):]
    names = tok.convert_ids_to_tokens(before + after)
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    single = [{"SpecialToken": {"id": t, "type_id": 0}} for t in names[:len(before)]] + [seq] + [
        {"SpecialToken": {"id": t, "type_id": 0}} for t in names[len(before):]]
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "TemplateProcessing", "single": single, "pair": single + [
        {"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": {
        t: {"id": t, "ids": [i], "tokens": [t]} for t, i in zip(names, before + after)}} if names else None
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    if tok("a")["input_ids"] != full:
        raise QuantizeError("the tokenizer cannot add BOS/EOS as llama.cpp does with this file",
                            "import its transformers directory")
    return tok


def verify(path: Path, out: Path, tok, quantized: bool) -> dict:
    """The new directory against llama.cpp on the source GGUF: BOS/EOS around text, the hard strings and the
    tokenizer's added tokens in text, and the logits on a probe of llama.cpp's own tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from appliance.quantize import quality

    hard = quality.hard_strings(tok)
    lc = llama_cpp_side(path, list(hard.values()), PROBE)
    tok = _match_specials(tok, out, lc)
    bad = [n for (n, text), theirs in zip(hard.items(), lc["tokens"])
           if tok(text, add_special_tokens=False)["input_ids"] != theirs]
    if bad:
        raise QuantizeError(f"the tokenizer rebuilt from the GGUF tokenizes {', '.join(bad[:3])} differently "
                            "from llama.cpp", "import the model's transformers directory")
    ids = lc["ids"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits[0].numpy()
    b = lc["scores"]
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    diff = float(np.abs(a - b).max()) if finite else float("inf")
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean()) if finite else 0.0
    if not finite or (not quantized and not (top1 == 1.0 and diff <= 1e-2)) or not top1 >= 0.9:
        raise QuantizeError(f"the model rebuilt from the GGUF computes differently from llama.cpp (top-1 agreement "
                            f"{top1:.2f}, max |logit diff| {diff:.3g})", "import the model's transformers directory")
    return {"hard_strings": len(hard), "probe_tokens": len(ids), "top1_agreement": top1, "max_logit_diff": diff}


def source_record(path: Path, figures: dict) -> dict:
    """What lineage keeps about an imported GGUF: as `train.bases.source_record`, plus the checks' figures."""
    from appliance.home import file_sha256

    return {"format": "gguf", "architecture": figures["architecture"], "model_type": ARCHES[figures["arch"]],
            "dtype": "float32", "weight_dtypes": ["float32"], "name": figures.get("name"), "revision": None,
            "transformers_version": None, "sharded": False, "files": {path.name: file_sha256(path)},
            "gguf": {k: figures[k] for k in ("tensor_types", "quantized", "rope", "hard_strings", "probe_tokens",
                                             "top1_agreement", "max_logit_diff")}}
