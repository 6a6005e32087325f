"""Where an appliance keeps its state, and the layout inside that directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import BundleRefused, bundle_errors


def default_home() -> Path:
    """`$APPLIANCE_HOME`, else the per-user data directory (XDG)."""
    if env := os.environ.get("APPLIANCE_HOME"):
        return Path(env).expanduser()
    return user_data_dir() / "appliance"


def user_data_dir() -> Path:
    """The per-user data directory (XDG_DATA_HOME, else ~/.local/share)."""
    return Path(os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share"))


@dataclass(frozen=True)
class Home:
    """The files of one appliance home. Everything is 0700/0600: the owner alone."""

    root: Path

    @property
    def keyring(self) -> Path:
        return self.root / "keyring.json"

    @property
    def database(self) -> Path:
        return self.root / "vault.duckdb"

    @property
    def tmp(self) -> Path:
        """DuckDB's spill directory; its files are encrypted."""
        return self.root / "tmp"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def outbox(self) -> Path:
        """Where agents' bundle exports land (a file name here, never a path: appliance/exchange.py)."""
        return self.root / "outbox"

    def exists(self) -> bool:
        return self.keyring.exists()

    def create_dirs(self) -> None:
        for d in (self.root, self.tmp, self.logs, self.artifacts):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write to a temp name in the same directory, fsync, then rename over `path` (see `atomic_file`)."""
    with atomic_file(path, mode) as f:
        f.write(data)


@contextmanager
def atomic_file(path: Path, mode: int = 0o600) -> Iterator:
    """A file to stream into under a temp name beside `path`; fsynced and renamed over `path` when the block
    ends, removed if it raises: `path` is either the old file or the whole new one, never half.

    The temp file is created exclusively, never through a link, with exactly `mode`, in the directory opened
    once and checked; a link at `path` is refused (`bundles.safefile`)."""
    from bundles.safefile import atomic_create

    with bundle_errors(), atomic_create(Path(path), mode) as f:
        yield f


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB pieces."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a directory under a hidden temp name beside `dest`; on success fsync it and rename it into place.

    A kill at any moment leaves either the old `dest` (or none) or the complete new one, never a half. The
    temp directory is private (0700, created exclusively); a link at `dest` is refused, never replaced.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink():
        raise BundleRefused(f"{dest} is a symbolic link", "refusing to write through it; remove the link")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
