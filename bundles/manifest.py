"""The manifest: what a bundle holds, signed as canonical JSON bytes.

Checked in full before anything is trusted or written: every problem is a refusal with its reason.
Paths are relative POSIX paths of regular files; anything that could reach outside the target directory
(absolute paths, `..`, backslashes, drive letters) or is not a plain file (symlinks, hardlinks, devices)
is refused, and so are duplicates, also ones that differ only in case (edge devices use FAT).
"""

from __future__ import annotations

import json
import posixpath
import re
import unicodedata
from datetime import UTC, datetime

from bundles.digest import ALGORITHM
from bundles.errors import BundleError

FORMAT = 1
KINDS = ("model", "gguf", "dataset", "eval", "installer")
MAX_FILES = 100_000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def canonical(manifest: dict) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(data: bytes) -> dict:
    """Manifest bytes -> dict; only the canonical form of a JSON object is accepted."""
    try:
        m = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"the manifest is not valid JSON ({e})", "the bundle is damaged") from None
    if not isinstance(m, dict) or canonical(m) != data:
        raise BundleError("the manifest is not in canonical form", "the bundle was altered or damaged")
    return m


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def utc(text: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise BundleError(f"manifest {what} {text!r} is not a time", "the bundle is damaged") from None
    if t.tzinfo is None:
        raise BundleError(f"manifest {what} has no time zone", "the bundle is damaged")
    return t.astimezone(UTC)


def check(m: dict, max_size: int) -> int:
    """Refuse any manifest a safe unpack could not honour; returns the total size of the files."""
    if m.get("format") != FORMAT:
        raise BundleError(f"bundle format {m.get('format')!r} is not supported (this reader knows {FORMAT})",
                          "update the appliance on this side")
    if m.get("kind") not in KINDS:
        raise BundleError(f"bundle kind {m.get('kind')!r} is unknown", f"kinds are {', '.join(KINDS)}")
    if not isinstance(m.get("name"), str) or not NAME.match(m["name"]):
        raise BundleError(f"bundle name {m.get('name')!r} is not allowed", "the bundle is damaged")
    v = m.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise BundleError(f"bundle version {v!r} is not a positive integer", "the bundle is damaged")
    created, expires = utc(m.get("created"), "created"), utc(m.get("expires"), "expires")
    if expires <= created:
        raise BundleError("the bundle expires before it was created", "the bundle is damaged")
    if m.get("digest") != ALGORITHM:
        raise BundleError(f"digest algorithm {m.get('digest')!r} is not supported", f"this reader knows {ALGORITHM}")
    recips = m.get("recipients")
    if not isinstance(recips, list) or not all(isinstance(r, str) for r in recips) or recips != sorted(recips):
        raise BundleError("the manifest's recipient list is malformed", "the bundle is damaged")
    files = m.get("files")
    if not isinstance(files, list) or not files:
        raise BundleError("the manifest lists no files", "the bundle is damaged")
    if len(files) > MAX_FILES:
        raise BundleError(f"the manifest lists {len(files)} files (limit {MAX_FILES})", "refusing to unpack it")
    seen: set[str] = set()
    dirs: set[str] = set()
    total = 0
    for f in files:
        if not isinstance(f, dict):
            raise BundleError("a manifest entry is not an object", "the bundle is damaged")
        path = f.get("path")
        _check_path(path)
        if f.get("type") != "file":
            raise BundleError(f"entry {path!r} is a {f.get('type')!r}, not a regular file",
                              "bundles carry regular files only (no links, devices or directories)")
        size = f.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"entry {path!r} has size {size!r}", "the bundle is damaged")
        if not isinstance(f.get("digest"), str) or not f["digest"].startswith(ALGORITHM + ":"):
            raise BundleError(f"entry {path!r} has no {ALGORITHM} digest", "the bundle is damaged")
        key = unicodedata.normalize("NFC", path).casefold()  # one name on NFC/NFD and case-blind filesystems
        if key in seen:
            raise BundleError(f"entry {path!r} appears twice (names equal up to case count as one)",
                              "the bundle is damaged or crafted")
        seen.add(key)
        parts = key.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        total += size
        if total > max_size:
            raise BundleError(f"the bundle unpacks to more than the limit of {max_size:,} bytes",
                              "raise --max-size if this size is expected")
    clash = sorted(seen & dirs)
    if clash:
        raise BundleError(f"entry {clash[0]!r} is both a file and a directory", "the bundle is damaged or crafted")
    return total


def _check_path(path) -> None:
    if not isinstance(path, str) or not path:
        raise BundleError(f"entry path {path!r} is empty or not text", "the bundle is damaged")
    why = None
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        why = "is absolute"
    elif "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path):
        why = "holds a backslash or a control character"
    elif any(p in ("", ".", "..") for p in path.split("/")):
        why = "has an empty, '.' or '..' component"
    elif posixpath.normpath(path) != path or len(path) > 4096:
        why = "is not a normal relative path"
    if why:
        raise BundleError(f"entry path {path!r} {why}", "refusing to unpack outside the target directory")
