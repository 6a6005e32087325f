"""The GGUF types the appliance exports, what llama.cpp calls them, and their default quality bounds."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import ApplianceError


class QuantizeError(ApplianceError):
    """An export, a quantization or an inference could not be done as asked."""


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama.cpp's llama_ftype (LLAMA_FTYPE_MOSTLY_*)
    block: int  # values per quantization block of the main tensor type: rows must be a multiple of it
    ppl_bound: float  # default: flag the export when perplexity rises more than this many percent
    exact: bool = False  # must agree with the source model token for token (top-1 agreement 1.0)


# Bounds: what a healthy export of a small model stays within on its own validation text. Large models
# lose less; an operator tightens them with --ppl-bound.
TYPES: dict[str, QuantType] = {t.name: t for t in (
    QuantType("f32", 0, 1, 0.1, exact=True),
    QuantType("f16", 1, 1, 0.5, exact=True),
    QuantType("q8_0", 7, 32, 1.0),
    QuantType("q6_k", 18, 256, 2.0),
    QuantType("q5_k_m", 17, 256, 4.0),
    QuantType("q4_k_m", 15, 256, 8.0),
    QuantType("q4_0", 2, 32, 15.0),
)}

# ggml tensor types by number, for reports (the subset llama.cpp writes for the types above).
GGML_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 12: "q4_k",
                   13: "q5_k", 14: "q6_k", 30: "bf16"}


def get(name: str) -> QuantType:
    from appliance.errors import UsageError

    key = name.lower()
    if key not in TYPES:
        raise UsageError(f"unknown quantization type {name!r}", f"use one of {', '.join(TYPES)}")
    return TYPES[key]
