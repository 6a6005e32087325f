"""The calls into llama.cpp (through llama-cpp-python): quantize a GGUF, load one, check one.

llama.cpp's own log goes to a buffer, not the operator's terminal: `logs()` returns it for reports and for
error messages, and APPLIANCE_DEBUG=1 prints it as it comes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from appliance.quantize.types import QuantizeError, QuantType

_LOG: list[str] = []
_CALLBACK = None  # kept referenced: llama.cpp holds a pointer to it


def lib():
    """llama_cpp, imported on first use (~0.2 s, loads the shared library), with its log captured."""
    global _CALLBACK
    try:
        import llama_cpp
    except ImportError as e:  # the wheel is built by `make setup`; an edge device installs it the same way
        raise QuantizeError("llama-cpp-python is not installed", "run `make setup` (it builds llama.cpp once)") from e
    if _CALLBACK is None:
        import llama_cpp._logger  # noqa: F401  (installs its own callback first; ours replaces it)

        @llama_cpp.llama_log_callback
        def _capture(level: int, text: bytes, user_data) -> None:
            line = text.decode("utf-8", "replace")
            if len(_LOG) < 20000:
                _LOG.append(line)
            if os.environ.get("APPLIANCE_DEBUG"):
                sys.stderr.write(line)

        _CALLBACK = _capture
        llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


def logs(clear: bool = False) -> str:
    text = "".join(_LOG)
    if clear:
        _LOG.clear()
    return text


def _last_error() -> str:
    for line in reversed("".join(_LOG).splitlines()):
        if "error" in line.lower() or "failed" in line.lower():
            return line.strip()[:200]
    return ""


def quantize(src: Path, dst: Path, qtype: QuantType, imatrix: dict[str, np.ndarray] | None = None,
             threads: int = 0) -> str:
    """`llama_model_quantize` from `src` (an f32 GGUF) to `dst` as `qtype`, with an importance matrix if given.

    Returns llama.cpp's log of the run (what it chose per tensor, how much of the importance matrix it used).
    """
    ll = lib()
    params = ll.llama_model_quantize_default_params()
    params.nthread = threads or (os.cpu_count() or 1)
    params.ftype = qtype.ftype
    keep = []  # the arrays and names must outlive the call
    if imatrix:
        entries = (ll.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            bname = name.encode()
            keep += [arr, bname]
            entries[i].name = bname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the list ends with a null name
        params.imatrix = entries
        keep.append(entries)
    logs(clear=True)
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise QuantizeError(f"llama.cpp could not quantize to {qtype.name}: {_last_error() or f'code {rc}'}",
                            "rerun with APPLIANCE_DEBUG=1 to see llama.cpp's log")
    return logs()


def check(path: Path) -> dict:
    """Read a GGUF's header and tensor table with gguf's reader; a clear error for anything else."""
    from gguf import GGUFReader

    if not path.is_file():
        raise QuantizeError(f"{path} does not exist", "pass a .gguf file, or a GGUF id from `appliance quantize "
                                                      "--list`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise QuantizeError(f"{path} is not a GGUF file", "pass a file written by `appliance quantize`")
    try:
        r = GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise QuantizeError(f"{path} is a truncated or corrupt GGUF",
                            "copy it again, or export it again with `appliance quantize`") from e
    end = max((int(t.data_offset) + int(t.n_bytes) for t in r.tensors), default=0)
    if end > path.stat().st_size:
        raise QuantizeError(f"{path} is truncated ({path.stat().st_size} of {end} bytes)",
                            "copy it again, or export it again with `appliance quantize`")
    fields = {}
    for key in ("general.architecture", "general.name", "general.file_type", "llama.context_length",
                "tokenizer.chat_template", "appliance.id", "appliance.type"):
        if key in r.fields:
            fld = r.fields[key]
            fields[key] = fld.contents() if hasattr(fld, "contents") else None
    ctx = r.fields.get(f"{fields.get('general.architecture')}.context_length")  # the key is per arch
    fields["context_length"] = ctx.contents() if ctx is not None and hasattr(ctx, "contents") else None
    return {"fields": fields, "reader": r}


def load(path: Path, n_ctx: int = 0, logits_all: bool = False, vocab_only: bool = False, threads: int = 0,
         seed: int = 0, f32_cache: bool = False):
    """A llama_cpp.Llama over `path` (checked first), with llama.cpp's log kept off the terminal. `f32_cache`
    keeps the KV cache in f32 (llama.cpp's default f16 cache alone moves logits by ~5e-3), for comparisons."""
    info = check(path)
    ll = lib()
    from llama_cpp import Llama

    n_ctx = n_ctx or int(info["fields"].get("context_length") or 2048)
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    logs(clear=True)
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                    vocab_only=vocab_only, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                    **({"type_k": 0, "type_v": 0} if f32_cache else {}))
    except (ValueError, RuntimeError) as e:
        raise QuantizeError(f"llama.cpp could not load {path}: {_last_error() or e}",
                            "rerun with APPLIANCE_DEBUG=1 to see llama.cpp's log") from e
    ll.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    return llm


def tensor_types(path: Path) -> list[dict]:
    """Name, ggml type, shape (ggml order: columns first) and bytes of every tensor in a GGUF."""
    from gguf import GGUFReader

    from appliance.quantize.types import GGML_TYPE_NAMES

    r = GGUFReader(str(path))
    return [{"name": t.name, "type": GGML_TYPE_NAMES.get(int(t.tensor_type), str(t.tensor_type.name).lower()),
             "shape": [int(x) for x in t.shape], "bytes": int(t.n_bytes), "elements": int(t.n_elements)}
            for t in r.tensors]
