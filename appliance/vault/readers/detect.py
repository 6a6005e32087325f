"""Which reader applies to which file, and the walk over the paths an operator names."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.vault.readers import Ident, ReadError, open_input
from appliance.vault.readers.code import LINK, is_repo, language_of, walk_repo

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".text", ".adoc", ".org", ".log", ".hl7"})
SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


LINK_SKIPPED = "symbolic link (not followed; an operator may pass --follow-links)"
LINK_INTO_HOME = "symbolic link into the appliance home (refused)"
INSIDE_HOME = "inside the appliance home (refused)"


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
    size: int = 0
    ident: Ident | None = None  # (st_dev, st_ino) the walk saw: readers open that file or nothing (open_input)


@dataclass
class Walk:
    """How the walk treats links: never followed, unless `follow_links` (operators only); never into `home`."""

    follow_links: bool = False
    home: Path | None = None
    seen: set = field(default_factory=set)  # (st_dev, st_ino) of directories walked: no loops through links

    def inside_home(self, real: str | Path) -> bool:
        return self.home is not None and Path(real).is_relative_to(Path(os.path.realpath(self.home)))


def kind_of(path: Path, ident: Ident | None = None) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix == ".eml":
        return "email"
    if suffix in (".mbox", ".mbx"):
        return "mbox"
    # imported here: the module brings DuckDB and pyarrow, which a scan worker that reads no table never needs
    from appliance.vault.readers.tables import READERS as TABLE_READERS

    if suffix in TABLE_READERS:
        return "table"
    if suffix == ".pdf":
        return "pdf"
    if suffix == ".docx":
        return "docx"
    try:
        with open_input(path, ident) as f:
            head = f.read(4096)
    except (OSError, ReadError):
        return None
    if head.startswith(b"From ") and b"\n" in head:
        return "mbox"
    if b"\0" not in head and suffix == "":
        return "text"
    return None


def plan(paths: list[Path], follow_links: bool = False, home: Path | None = None) -> Iterator[Item]:
    """Everything under `paths`, in a stable order; repositories are recognised and walked as code.

    A path named here is taken as named (a link is resolved once); below it no link is followed unless
    `follow_links`, and nothing inside `home` is ever read. Each link is reported as a skipped item."""
    walk = Walk(follow_links, home)
    for top in paths:
        real = os.path.realpath(top)
        if not os.path.lexists(top) or not os.path.exists(real):
            yield Item(top, "skip", reason="no such file or directory", explicit=True)
        elif walk.inside_home(real):
            yield Item(top, "skip", reason=INSIDE_HOME, explicit=True)
        elif os.path.isfile(real):
            st = os.stat(real)
            kind = kind_of(Path(real), _ident(st))
            yield Item(kind=kind or "skip", reason=None if kind else "unsupported file type", explicit=True,
                       **_file_attrs(real, top, st))
        else:
            walk.seen.add(_ident(os.stat(real)))
            yield from _walk(Path(real) if os.path.islink(top) else top, walk)


def _ident(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino


def _file_attrs(real: str, named: Path, st: os.stat_result) -> dict:
    """`path` stays the name the operator gave (it is the record's source); a named link is opened resolved."""
    return {"path": Path(real) if os.path.islink(named) else named, "size": st.st_size, "ident": _ident(st)}


def _walk(top: Path, walk: Walk) -> Iterator[Item]:
    if is_repo(top):
        yield from _repo_items(top, walk)
        return
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    real_dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
    repos = [e for e in real_dirs if is_repo(Path(e.path))]
    dirs = [e for e in real_dirs if e not in repos and not e.name.startswith(".")]
    for e in entries:
        if e.name in SKIP_NAMES or e.name.startswith(".") or e.is_dir(follow_symlinks=False):
            continue
        path = Path(e.path)
        if e.is_symlink():
            yield from _link(path, walk)
            continue
        st = e.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            yield Item(path, "skip", reason="not a regular file", size=0)
            continue
        kind = kind_of(path, _ident(st))
        yield Item(path, kind or "skip", reason=None if kind else "unsupported file type", size=st.st_size,
                   ident=_ident(st))
    for e in repos:
        yield from _repo_items(Path(e.path), walk)
    for e in dirs:
        st = e.stat(follow_symlinks=False)
        if _ident(st) not in walk.seen:
            walk.seen.add(_ident(st))
            yield from _walk(Path(e.path), walk)


def _link(path: Path, walk: Walk, code: dict | None = None) -> Iterator[Item]:
    """A link met in the walk: reported as skipped; with --follow-links, followed unless it leads into the
    home (checked on the fully resolved target). `code`: repository attributes when inside a repository."""
    extra = code or {}
    if not walk.follow_links:
        yield Item(path, "skip", reason=LINK_SKIPPED, **extra)
        return
    real = os.path.realpath(path)
    if walk.inside_home(real):
        yield Item(path, "skip", reason=LINK_INTO_HOME, **extra)
        return
    try:
        st = os.stat(real)
    except OSError:
        yield Item(path, "skip", reason="broken symbolic link", **extra)
        return
    if stat.S_ISDIR(st.st_mode):
        if code is not None:
            yield Item(path, "skip", reason="symbolic link to a directory inside a repository (not followed)",
                       **extra)
        elif _ident(st) not in walk.seen:
            walk.seen.add(_ident(st))
            yield from _walk(Path(real), walk)
        return
    if not stat.S_ISREG(st.st_mode):
        yield Item(path, "skip", reason="not a regular file", **extra)
        return
    if code is not None:
        yield Item(Path(real), "code", size=st.st_size, ident=_ident(st), **extra)
        return
    kind = kind_of(Path(real), _ident(st))
    yield Item(Path(real), kind or "skip", reason=None if kind else "unsupported file type", size=st.st_size,
               ident=_ident(st))


def _repo_items(root: Path, walk: Walk) -> Iterator[Item]:
    for path, rel, reason in walk_repo(root):
        code = {"rel": rel, "repo": root.name}
        if reason == LINK:
            yield from _link(path, walk, dict(code, language=language_of(path)))
        elif reason:
            yield Item(path, "skip", reason=reason, **code)
        else:
            try:
                st = os.lstat(path)
            except OSError:
                continue
            yield Item(path, "code", language=language_of(path), size=st.st_size if stat.S_ISREG(st.st_mode)
                       else 0, ident=_ident(st), **code)
