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

from appliance import sealed
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
    """Read a GGUF's header and tensor table with gguf's reader; a clear error for anything else. A sealed
    GGUF is read from memory (its reader's map keeps the in-memory file alive)."""
    path = Path(path)
    if sealed.exists(path) and not path.is_file():
        with sealed.opened(path) as p:
            return _check(p)
    return _check(path)


def _check(path: Path) -> dict:
    from gguf import GGUFReader

    if not path.is_file():
        raise QuantizeError(f"{path} does not exist", "pass a .gguf file, or a GGUF id from `appliance quantize "
                                                      "--list`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise QuantizeError(f"{path} is not a GGUF file", "pass a file written by `appliance quantize`")
    if problem := header_problem(path):  # before gguf's reader, which trusts every count it reads
        raise QuantizeError(f"{path} is a corrupt GGUF ({problem})", "copy it again, or export it again")
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


# GGUF value types (gguf.GGUFValueType) -> size in bytes; 8 (string) and 9 (array) have their own layout
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def header_problem(path: Path) -> str | None:
    """What is wrong with a GGUF's header, read with every count bounded by the bytes left, or None.

    gguf's reader loops over whatever count a header declares: a 162-byte file declaring an array of 2^61
    numbers would keep it busy, growing memory, until killed. Here each count must fit in the rest of the file
    before anything is read, and tensor data must lie in order without overlapping (many tensors pointing at
    the same bytes would let a small file expand to gigabytes when dequantized)."""
    import mmap
    import struct

    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            return "empty file"
    with mm:
        size, pos = len(mm), 4

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise ValueError("it ends inside its header")
            v = struct.unpack_from(fmt, mm, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        def string() -> None:
            nonlocal pos
            n = take("<Q")
            if n > size - pos:
                raise ValueError(f"a string of {n} bytes in {size - pos} left")
            pos += n

        def value(kind: int, depth: int = 0) -> None:
            nonlocal pos
            if kind in _FIXED:
                take(f"<{_FIXED[kind]}s")
            elif kind == 8:
                string()
            elif kind == 9 and depth < 4:
                item, count = take("<I"), take("<Q")
                least = _FIXED.get(item, 8 if item == 8 else 12)
                if count * least > size - pos:
                    raise ValueError(f"an array of {count} items in {size - pos} bytes")
                if item in _FIXED:
                    pos += count * _FIXED[item]
                else:
                    for _ in range(count):
                        value(item, depth + 1)
            else:
                raise ValueError(f"value type {kind}")

        try:
            version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
            if version not in (2, 3):
                return f"version {version}"
            if n_kv * 13 > size or n_tensors * 28 > size:
                return f"{n_kv} keys and {n_tensors} tensors do not fit in {size} bytes"
            for _ in range(n_kv):
                string()
                value(take("<I"))
            spans = []
            for _ in range(n_tensors):
                string()
                dims = take("<I")
                if dims > 8:
                    return f"a tensor with {dims} dimensions"
                for _ in range(dims):
                    take("<Q")
                take("<I")
                spans.append(take("<Q"))
        except (ValueError, struct.error) as e:
            return str(e)
        if spans != sorted(spans) or len(set(spans)) != len(spans):
            return "tensor data out of order or overlapping"
    return None


def load(path: Path, n_ctx: int = 0, logits_all: bool = False, vocab_only: bool = False, threads: int = 0,
         seed: int = 0, f32_cache: bool = False, n_gpu_layers: int = 0):
    """A llama_cpp.Llama over `path` (checked first), with llama.cpp's log kept off the terminal. `f32_cache`
    keeps the KV cache in f32 (llama.cpp's default f16 cache alone moves logits by ~5e-3), for comparisons.
    `n_gpu_layers`: layers offloaded to the GPU on a CUDA build (-1: all); comparisons keep the default, 0.

    A sealed GGUF of a home whose vault is open here is decrypted into an anonymous in-memory file and loaded
    from its /proc/self/fd path: llama.cpp maps it, so it stays in memory after the descriptor closes."""
    with sealed.opened(path) as p:
        return _load(p, path, n_ctx, logits_all, vocab_only, threads, seed, f32_cache, n_gpu_layers)


def _load(path: Path, shown: Path, n_ctx: int, logits_all: bool, vocab_only: bool, threads: int, seed: int,
          f32_cache: bool, n_gpu_layers: int = 0):
    info = check(path)
    ll = lib()
    from llama_cpp import Llama

    n_ctx = n_ctx or int(info["fields"].get("context_length") or 2048)
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    logs(clear=True)
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                    vocab_only=vocab_only, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                    n_gpu_layers=n_gpu_layers, **({"type_k": 0, "type_v": 0} if f32_cache else {}))
    except (ValueError, RuntimeError) as e:
        raise QuantizeError(f"llama.cpp could not load {shown}: {_last_error() or e}",
                            "rerun with APPLIANCE_DEBUG=1 to see llama.cpp's log") from e
    ll.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    return llm


def tensor_types(path: Path) -> list[dict]:
    """Name, ggml type, shape (ggml order: columns first) and bytes of every tensor in a GGUF."""
    from gguf import GGUFReader

    from appliance.quantize.types import GGML_TYPE_NAMES

    with sealed.opened(path) as p:
        r = GGUFReader(str(p))
    return [{"name": t.name, "type": GGML_TYPE_NAMES.get(int(t.tensor_type), str(t.tensor_type.name).lower()),
             "shape": [int(x) for x in t.shape], "bytes": int(t.n_bytes), "elements": int(t.n_elements)}
            for t in r.tensors]
