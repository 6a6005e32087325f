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
    return path.is_dir() and any((path / m).exists() for m in REPO_MARKERS)


def language_of(path: Path) -> str | None:
    return NAMED.get(path.name) or LANGUAGES.get(path.suffix) or LANGUAGES.get(path.suffix.lower())


def walk_repo(root: Path) -> Iterator[tuple[Path, str, str | None]]:
    """(path, repo-relative path, skip reason or None) in a stable order. Git-ignored paths are not yielded;
    vendored directories are yielded once, with their reason, and not entered."""
    specs: list[tuple[str, pathspec.PathSpec]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        gi = Path(dirpath) / ".gitignore"
        if gi.is_file():
            try:
                lines = gi.read_text(encoding="utf-8", errors="replace").splitlines()
                specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))
            except OSError:
                pass
        kept = []
        for d in sorted(dirnames):
            if _ignored(specs, rel_dir + d + "/") or d == ".git":
                continue
            if d in SKIP_DIRS:
                yield Path(dirpath) / d, rel_dir + d + "/", "vendored or generated directory"
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = rel_dir + name
            if name == ".gitignore" or _ignored(specs, rel):
                continue
            yield Path(dirpath) / name, rel, None


def _ignored(specs: list[tuple[str, pathspec.PathSpec]], rel: str) -> bool:
    for base, spec in specs:
        if rel.startswith(base) and spec.match_file(rel[len(base):]):
            return True
    return False
