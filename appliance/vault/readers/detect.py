"""Which reader applies to which file, and the walk over the paths an operator names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from appliance.vault.readers.code import is_repo, language_of, walk_repo
from appliance.vault.readers.tables import READERS as TABLE_READERS

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".text", ".adoc", ".org", ".log"})
SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


@dataclass
class Item:
    """One thing to ingest, or to report as skipped."""

    path: Path
    kind: str  # text | email | mbox | code | table | pdf | docx | skip
    rel: str | None = None  # repository-relative path for code
    language: str | None = None
    repo: str | None = None
    reason: str | None = None  # why it is skipped
    explicit: bool = False  # named on the command line: unsupported is an error, not a skip

    @cached_property
    def size(self) -> int:
        try:
            return self.path.stat().st_size if self.path.is_file() else 0
        except OSError:
            return 0


def kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix == ".eml":
        return "email"
    if suffix in (".mbox", ".mbx"):
        return "mbox"
    if suffix in TABLE_READERS:
        return "table"
    if suffix == ".pdf":
        return "pdf"
    if suffix == ".docx":
        return "docx"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"From ") and b"\n" in head:
        return "mbox"
    if b"\0" not in head and suffix == "":
        return "text"
    return None


def plan(paths: list[Path]) -> Iterator[Item]:
    """Everything under `paths`, in a stable order; repositories are recognised and walked as code."""
    for top in paths:
        if not top.exists():
            yield Item(top, "skip", reason="no such file or directory", explicit=True)
        elif top.is_file():
            kind = kind_of(top)
            yield Item(top, kind or "skip", reason=None if kind else "unsupported file type", explicit=True)
        else:
            yield from _walk(top)


def _walk(top: Path) -> Iterator[Item]:
    if is_repo(top):
        yield from _repo_items(top)
        return
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        repos = [d for d in sorted(dirnames) if is_repo(here / d)]
        dirnames[:] = sorted(d for d in dirnames if d not in repos and not d.startswith("."))
        for name in sorted(filenames):
            if name in SKIP_NAMES or name.startswith("."):
                continue
            path = here / name
            kind = kind_of(path)
            yield Item(path, kind or "skip", reason=None if kind else "unsupported file type")
        for d in repos:
            yield from _repo_items(here / d)


def _repo_items(root: Path) -> Iterator[Item]:
    for path, rel, reason in walk_repo(root):
        if reason:
            yield Item(path, "skip", rel=rel, repo=root.name, reason=reason)
        else:
            yield Item(path, "code", rel=rel, language=language_of(path), repo=root.name)
