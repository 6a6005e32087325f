"""Code repositories: walk a repository honouring its .gitignore files, skip binaries and vendored or
generated directories, and keep each file's repository-relative path and language."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pathspec

SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "node_modules", "vendor", "vendored", "third_party", "thirdparty", "external",
    ".venv", "venv", "env", "site-packages", "__pycache__", "dist", "build", "target", ".tox", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".idea", ".vscode", ".gradle", "bower_components", ".eggs",
})
REPO_MARKERS = (".git", ".gitignore")

LANGUAGES = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
    ".cxx": "cpp", ".rs": "rust", ".go": "go", ".java": "java", ".kt": "kotlin", ".scala": "scala",
    ".js": "javascript", ".mjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".rb": "ruby", ".php": "php", ".cs": "csharp", ".swift": "swift", ".m": "objective-c", ".sh": "shell",
    ".bash": "shell", ".zsh": "shell", ".ps1": "powershell", ".sql": "sql", ".r": "r", ".R": "r",
    ".jl": "julia", ".lua": "lua", ".pl": "perl", ".hs": "haskell", ".ml": "ocaml", ".ex": "elixir",
    ".exs": "elixir", ".erl": "erlang", ".clj": "clojure", ".dart": "dart", ".f90": "fortran", ".vhd": "vhdl",
    ".v": "verilog", ".sv": "systemverilog", ".md": "markdown", ".rst": "rst", ".txt": "text",
    ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json", ".xml": "xml", ".html": "html",
    ".css": "css", ".ini": "ini", ".cfg": "ini", ".cmake": "cmake", ".proto": "protobuf", ".tf": "terraform",
    ".gradle": "groovy", ".groovy": "groovy", ".mk": "make",
}
NAMED = {"Makefile": "make", "Dockerfile": "dockerfile", "CMakeLists.txt": "cmake", "Jenkinsfile": "groovy"}


def is_repo(path: Path) -> bool:
    """A real directory (not a link) holding a repository marker."""
    return not path.is_symlink() and path.is_dir() and any(os.path.lexists(path / m) for m in REPO_MARKERS)


def language_of(path: Path) -> str | None:
    return NAMED.get(path.name) or LANGUAGES.get(path.suffix) or LANGUAGES.get(path.suffix.lower())


def walk_repo(root: Path) -> Iterator[tuple[Path, str, str | None]]:
    """(path, repo-relative path, skip reason or None) in a stable order. Git-ignored paths are not yielded;
    vendored directories are yielded once, with their reason, and not entered. Links are never followed:
    each is yielded with the reason LINK, for the caller to report (or follow, if the operator asked)."""
    yield from _walk_repo_dir(root, "", [])


LINK = "symbolic link"


def _walk_repo_dir(here: Path, rel_dir: str, specs: list[tuple[str, pathspec.PathSpec]]
                   ) -> Iterator[tuple[Path, str, str | None]]:
    try:
        with os.scandir(here) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    by_name = {e.name: e for e in entries}
    gi = by_name.get(".gitignore")
    if gi is not None and gi.is_file(follow_symlinks=False):
        lines = _read_gitignore(Path(gi.path))
        if lines is not None:
            specs = specs + [(rel_dir, pathspec.GitIgnoreSpec.from_lines(lines))]
    dirs = []
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if e.name == ".git" or _ignored(specs, rel_dir + e.name + "/"):
                continue
            if e.name in SKIP_DIRS:
                yield Path(e.path), rel_dir + e.name + "/", "vendored or generated directory"
            else:
                dirs.append(e)
    for e in entries:
        rel = rel_dir + e.name
        if e.is_dir(follow_symlinks=False) or e.name == ".gitignore" or _ignored(specs, rel):
            continue
        yield Path(e.path), rel, LINK if e.is_symlink() else None
    for e in dirs:
        yield from _walk_repo_dir(Path(e.path), rel_dir + e.name + "/", specs)


def _read_gitignore(path: Path) -> list[str] | None:
    from appliance.vault.readers import ReadError, open_input

    try:
        with open_input(path) as f:
            return f.read().decode("utf-8", errors="replace").splitlines()
    except (ReadError, OSError):
        return None


def _ignored(specs: list[tuple[str, pathspec.PathSpec]], rel: str) -> bool:
    for base, spec in specs:
        if rel.startswith(base) and spec.match_file(rel[len(base):]):
            return True
    return False
