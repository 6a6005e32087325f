"""Each benchmark owns one section of docs/BENCHMARKS.md, between `<!-- KEY:start -->` and `<!-- KEY:end -->`."""

from __future__ import annotations

from pathlib import Path


def update_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace the body of section `key` (added at the end under `title` the first time)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in text:
        text = text.rstrip() + f"\n\n## {title}\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def parser(doc: str, steps: int = 30):
    """The options every model benchmark takes: --steps, --threads, --smoke, --write."""
    import argparse
    import os

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model and few steps: checks in seconds that every part runs (not a measurement)")
    ap.add_argument("--write", type=Path, default=None, help="update this Markdown file's section")
    return ap
