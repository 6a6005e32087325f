"""Numbers and answers for people: the one place people-facing rounding lives.

The command line and the console format with these; `--json` (and every other API result) keeps exact
values, so nothing here is used on data that leaves as JSON.
"""

from __future__ import annotations

import math


def human_bytes(n: int | None) -> str:
    """A byte count in binary units (`512 B`, `1.5 KiB`, `2.0 GiB`); `-` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def num(x, digits: int = 4) -> str:
    """A number for people: `digits` significant figures, no exponent for everyday sizes (449.2, 1442, 0.0123).

    `--json` keeps exact values; only human output goes through here.
    """
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or x != x or x in (float("inf"), float("-inf")):
        return f"{x:,}" if isinstance(x, int) and abs(x) >= 10_000 else str(x)
    if x == 0:
        return "0"
    text = f"{x:.{digits}g}"
    if "e" in text and 1e-4 <= abs(x) < 10 ** (digits + 2):  # 1.442e+03 reads worse than 1442
        text = f"{x:.{max(digits - 1 - int(math.floor(math.log10(abs(x)))), 0)}f}"
    return text


def change(a, b) -> str:
    """`a -> b` with the relative change, as people read it: `449.2 -> 1442 (+221 %)`."""
    text = f"{num(a)} -> {num(b)}"
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and a:
        text += f" ({(b - a) / abs(a):+.0%})".replace("%", " %")
    return text


def blank_note(text: str) -> str | None:
    """A visible stand-in for an answer that is empty or only whitespace ("(blank answer: 12 newlines)"),
    so an undertrained model's "\\n\\n\\n" is not mistaken for no output at all; None for a real answer."""
    if text.strip():
        return None
    if not text:
        return "(blank answer: nothing generated)"
    kinds = [(text.count("\n"), "newline"), (text.count(" "), "space"), (text.count("\t"), "tab")]
    other = len(text) - sum(n for n, _ in kinds)
    parts = [f"{n} {name}{'s' if n != 1 else ''}" for n, name in kinds if n]
    parts += [f"{other} other whitespace"] if other else []
    return f"(blank answer: {', '.join(parts)})"
