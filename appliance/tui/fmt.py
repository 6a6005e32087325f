"""How the console shows values; times and sizes in one place (snapshot tests pin the ones that move)."""

from __future__ import annotations

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
