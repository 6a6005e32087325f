"""Read a model's safetensors weights with numpy alone (memory-mapped), so export needs no torch.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw tensors. Sharded models add `model.safetensors.index.json` mapping names to files. bf16, which
numpy lacks, is widened to f32 exactly (its bits are the top half of an f32).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from appliance.quantize.types import QuantizeError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 << 20


class Weights:
    """Name -> tensor, lazily; `get` returns a float32 array (a view of the mapped file where possible)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise QuantizeError(f"{index} is not a valid safetensors index ({e})",
                                    "re-save the model with save_pretrained") from e
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise QuantizeError(f"{model_dir} has no model.safetensors",
                                "export works on safetensors weights; re-save the model with save_pretrained")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            path = model_dir / f
            header, start = _header(path)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, info, start)
        self._maps: dict[Path, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def get(self, name: str) -> np.ndarray:
        path, info, start = self._info(name)
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise QuantizeError(f"tensor {name} has dtype {dtype}, which export does not read",
                                "save the model in float32, float16 or bfloat16")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][start + begin:start + end]
        arr = raw.view(_DTYPES[dtype]).reshape(info["shape"])
        if dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr if arr.dtype == np.float32 else arr.astype(np.float32)

    def _info(self, name: str) -> tuple[Path, dict, int]:
        if name not in self._where:
            raise QuantizeError(f"the model has no tensor {name}", "is this a complete model directory?")
        return self._where[name]


def _header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantizeError(f"{path} is truncated", "re-save or re-copy the model")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise QuantizeError(f"{path} is not a safetensors file (or is truncated)", "re-save the model")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise QuantizeError(f"{path} has a corrupt header", "re-save the model") from e
    start = 8 + n
    for name, info in header.items():
        if name != "__metadata__" and start + info["data_offsets"][1] > size:
            raise QuantizeError(f"{path} is truncated (tensor {name} runs past the end)", "re-copy the model")
    return header, start
