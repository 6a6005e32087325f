"""Where things are in a TOML file's text, so a message can say FILE:LINE (tomllib keeps no positions).

Shared by the files operators write by hand: eval suites and agentic task files.
"""

from __future__ import annotations

import re
import tomllib


class TomlLines:
    """The lines of every table header ([name] and [[name]]) and of the keys under them."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.heads: dict[str, list[int]] = {}  # table name -> the line of each of its headers, in order
        self.tables: list[int] = []  # every table header, of any name
        for i, line in enumerate(self.lines, 1):
            if re.match(r"\s*\[", line):
                self.tables.append(i)
            m = re.match(r"\s*\[\[?\s*([A-Za-z0-9_-]+)\s*\]", line)
            if m:
                self.heads.setdefault(m.group(1), []).append(i)

    def of(self, table: str, index: int = 0, key: str | None = None) -> int:
        """The line of the `index`-th (0-based) [table] or [[table]], or of `key = ...` inside it; "" is the
        top level, before any header. Falls back to the table's header, then to line 1."""
        if table:
            heads = self.heads.get(table, [])
            start = heads[index] if index < len(heads) else 1
            end = min([h for h in self.tables if h > start], default=len(self.lines) + 1)
        else:
            start, end = 1, min(self.tables, default=len(self.lines) + 1)
        if key:
            for i in range(start, end):
                if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i - 1]):
                    return i
        return start


def decode_error(e: tomllib.TOMLDecodeError) -> tuple[int, str]:
    """(line, what) of a TOML syntax error, without tomllib's "(at line L, column C)" tail."""
    m = re.search(r"\(at line (\d+)", str(e))
    return (int(m.group(1)) if m else 1), str(e).split(" (at")[0]
