"""A line plot in the terminal, drawn with braille dots (2x4 per cell): the loss curve."""

from __future__ import annotations

import math

from textual.widget import Widget

# bit of each dot in a braille cell, by (column, row)
DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
AXIS = 9  # characters of y-axis labels


def render_plot(values: list[float], width: int, height: int) -> list[str]:
    """`values` scaled into `height` rows of `width` characters, y labels on the left."""
    cols = max(1, width - AXIS)
    values = [v for v in values if math.isfinite(v)]  # a diverged step is not drawn
    if not values:
        return ["(no steps yet)".center(width)] + [" " * width] * (height - 1)
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    w, h = cols * 2, height * 4
    grid = [[0] * cols for _ in range(height)]
    n = len(values)
    prev = None
    for x in range(w):
        v = values[min(n - 1, x * n // w)] if n >= w else values[round(x * (n - 1) / max(1, w - 1))]
        y = h - 1 - round((v - lo) / span * (h - 1))
        for yy in range(min(y, prev), max(y, prev) + 1) if prev is not None else (y,):
            grid[yy // 4][x // 2] |= DOTS[x % 2][yy % 4]
        prev = y
    lines = []
    for r in range(height):
        label = f"{hi:>8.3f} " if r == 0 else f"{lo:>8.3f} " if r == height - 1 else " " * AXIS
        lines.append(label + "".join(chr(0x2800 + c) if c else " " for c in grid[r]))
    return lines


class LinePlot(Widget):
    """Shows the values it was last given; re-draws at its own size."""

    DEFAULT_CSS = "LinePlot { height: 8; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.values: list[float] = []

    def set_values(self, values: list[float]) -> None:
        self.values = list(values)
        self.refresh()

    def render(self) -> str:
        return "\n".join(render_plot(self.values, self.size.width, max(2, self.size.height)))
