"""Files that live only in memory: anonymous in-memory files, and directories of them.

`MemFile` is a `memfd_create` file: it has no name on any filesystem, lives in this process's memory
(swap aside, like any memory) and is gone when its last descriptor closes. Code that wants a path gets
`/proc/PID/fd/N`: this process opens it (llama.cpp, safetensors' memory map); another process only when this
one may be read by it, which a key holder (made non-dumpable by `hardening.protect_process`) never is.

`MemDir` gives a library that loads or saves a whole directory by path (`from_pretrained`,
`save_pretrained`) a directory whose entries are links to such files: the links name the files, the
bytes are in memory only. It is made private (0700) under the home's `tmp/`, holds nothing but links, and
is removed with its files when closed. After a save, `check` refuses any entry that is not one of its links:
a library that wrote a file of its own there would have put plaintext on the disk.
"""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import tempfile
from pathlib import Path

from appliance.errors import ApplianceError


class MemFile:
    """An anonymous in-memory file of `size` bytes (it grows if written through its path)."""

    def __init__(self, name: str, size: int = 0, fd: int | None = None):
        # sealing allowed: `freeze` makes one read-only for good before it is handed to another process
        self.fd = os.memfd_create(name[:200] or "file", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING) if fd is None else fd
        if size:
            os.ftruncate(self.fd, size)

    @classmethod
    def adopt(cls, fd: int) -> MemFile:
        """The in-memory file behind a descriptor received from another process (it must be one, frozen)."""
        import fcntl

        try:
            frozen = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _FROZEN == _FROZEN
        except OSError:
            frozen = False
        if not frozen:
            os.close(fd)
            raise ApplianceError("a file handed over is not a read-only in-memory file", "a defect: report it")
        os.set_inheritable(fd, False)  # never passed on to a program this process runs
        return cls("", fd=fd)

    def freeze(self) -> None:
        """Make the file read-only for good, for every process that holds it (memfd seals: no write, no resize,
        no further seal change): what a process hands another to read, never to alter."""
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _FROZEN | fcntl.F_SEAL_SEAL)

    def dup(self) -> MemFile:
        """Another descriptor of the same file, closed on its own."""
        return MemFile("", fd=os.dup(self.fd))

    @classmethod
    def of(cls, name: str, data) -> MemFile:
        f = cls(name, len(data))
        if len(data):
            with f.map(write=True) as m:
                m[:] = data
        return f

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def map(self, write: bool = False) -> mmap.mmap | _Empty:
        """A memory map of the whole file (an empty buffer for an empty file, which mmap refuses)."""
        if not self.size:
            return _Empty()
        return mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))

    def read(self) -> bytes:
        with self.map() as m:
            return bytes(m)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _frozen_seals() -> int:
    import fcntl

    return fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


_FROZEN = _frozen_seals()


class _Empty(bytearray):
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class MemDir:
    """A private directory of links to in-memory files; see the module docstring."""

    def __init__(self, parent: Path, files: dict[str, MemFile] | None = None):
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".mem-{os.getpid()}-", dir=parent))
        self.files: dict[str, MemFile] = {}
        self.content_hash: str | None = None  # set by `sealed.Store.building` once the files are sealed
        for name, f in (files or {}).items():
            self.add(name, f)

    def add(self, name: str, f: MemFile) -> None:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
            raise ApplianceError(f"refusing the in-memory file name {name!r}", "names are relative, without '..'")
        (self.path / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.symlink(f.path, self.path / name)
        self.files[name] = f

    def new(self, name: str) -> MemFile:
        f = MemFile(Path(name).name)
        self.add(name, f)
        return f

    def rename(self, old: str, new: str) -> None:
        """Give the in-memory file `old` the name `new` (its link moves; the bytes stay where they are)."""
        f = self.files.pop(old)
        os.unlink(self.path / old)
        self.add(new, f)

    def check(self) -> dict[str, MemFile]:
        """The files written through the links; a plain file or any other entry made there is refused."""
        for dirpath, dirnames, filenames in os.walk(self.path):
            for n in filenames + dirnames:
                p = Path(dirpath, n)
                rel = str(p.relative_to(self.path))
                mode = os.lstat(p).st_mode
                if stat.S_ISDIR(mode) and any(k.startswith(rel + "/") for k in self.files):
                    continue
                if not (stat.S_ISLNK(mode) and rel in self.files and os.readlink(p) == self.files[rel].path):
                    _shred(p)
                    raise ApplianceError(f"a library wrote {rel} as a file on disk where only in-memory files "
                                         "may be", "it was removed; report this, it is a defect")
        return self.files

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for f in self.files.values():
            f.close()
        self.files = {}

    def __enter__(self) -> MemDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shred(p: Path) -> None:
    """Overwrite a stray regular file before removing it (a directory is removed whole)."""
    if p.is_symlink() or not p.exists():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        for q in p.rglob("*"):
            if q.is_file() and not q.is_symlink():
                _shred(q)
        shutil.rmtree(p, ignore_errors=True)
    else:
        with open(p, "r+b") as f:
            f.write(b"\0" * os.fstat(f.fileno()).st_size)
            f.flush()
            os.fsync(f.fileno())
        p.unlink()


def sweep(parent: Path) -> list[str]:
    """Remove what a killed process left in `parent` (the home's tmp/): its in-memory directories' links
    (`.mem-PID-*`) and import staging (`.import-PID-*`, shredded), when process PID is gone."""
    gone = []
    if not parent.is_dir():
        return gone
    for d in parent.iterdir():
        parts = d.name.split("-")
        if not (d.is_dir() and not d.is_symlink() and len(parts) >= 3 and parts[0] in (".mem", ".import")
                and parts[1].isdigit()):
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _shred(d)
        gone.append(d.name)
    return gone
