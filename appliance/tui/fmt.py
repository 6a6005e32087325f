"""How the console shows values; times and sizes in one place (snapshot tests pin the ones that move)."""

from __future__ import annotations

import json

from appliance.api.format import human_bytes


def when(ts: str | None) -> str:
    """`2026-11-29T10:01:06Z` -> `2026-11-29 10:01`."""
    return (ts or "")[:16].replace("T", " ")


def size(n: int | None) -> str:
    return human_bytes(n) if n is not None else "-"


def place(path) -> str:
    """Where something lives on this box."""
    return str(path)


def disk(n: int) -> str:
    """A file's size on disk (the vault's grows in steps as DuckDB checkpoints)."""
    return human_bytes(n)


def rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:,.0f} tok/s"


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def details(d) -> str:
    """An audit entry's details, compact, with every number cut to 4 significant digits: a loss of
    6.849109319251354 reads 6.849 (the last digits are float noise that differs from one CPU to the next)."""
    def cut(v):
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, list):
            return [cut(x) for x in v]
        return v
    return json.dumps(cut(d), separators=(",", ":"))
