"""Sealed artifacts: every file under HOME/artifacts is stored encrypted and opened only in memory.

Models, adapters, tokenizers, checkpoints, GGUF files and reports derive from vault data, so they are kept
as sealed as the data. An artifact is a directory (`models/NAME@K`, `gguf/NAME@K-TYPE`, `runs/ID`, ...);
its id is that path under `artifacts/`. Each artifact has a random 256-bit key, kept in the vault's
`artifact_keys` table: only the data key's holder can read it, a `vault rekey` re-encrypts it with the rest
of the database (so rekey costs nothing per artifact), and a training run's ranks are handed the keys of
the artifacts they write, never the vault's; what they read is handed to them open (`Store.hand_over`).

A sealed file is `NAME.sealed`: MAGIC, a random 16-byte nonce, then the file's bytes as a STREAM
(`bundles.stream`: ChaCha20-Poly1305, 1 MiB chunks, sealed and opened on every core) under
HKDF(artifact key, nonce, artifact id + file name). The id and name in the key bind a file to its place:
moved into another artifact or renamed, it does not open; cut, extended or altered, it does not open.

Each sealed directory (an artifact, and each checkpoint inside a run) holds a manifest, `.appliance-manifest.sealed`,
sealed like its files and written last, with the directory: every file's name, plaintext size, sealed size and
nonce (the nonce names one write of a file: its key derives from it, so no other sealed bytes open under it), a
write counter and a random write id. A directory is checked against it whenever it is opened: a file removed,
added, or put back from an earlier write of the same artifact does not open. The vault records, beside each
key, whether the artifact is written with manifests (every one made since): a directory without one opens as
before only in an artifact made before manifests (`vault check` lists those); in any other, its manifest was
deleted, and it does not open.

Reading never writes plaintext: `Store.opened(path)` gives a path for a loader (transformers, llama.cpp,
safetensors) that points into memory (`memfiles`): a sealed file becomes an anonymous in-memory file, a
sealed directory a private directory of links to them. Writing builds the files in memory (`Store.building`)
and seals each one into a directory renamed into place whole. A path outside the artifacts (an operator's
own directory given on the command line) is used as it is.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from appliance.errors import ApplianceError, VaultError
from appliance.memfiles import MemDir, MemFile
from bundles import stream

MAGIC = b"APPLIANCE-SEALED-1\n"
SUFFIX = ".sealed"
NONCE = 16
_INFO = b"appliance-sealed-v1\x00"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".distcp")
MANIFEST = ".appliance-manifest"  # a sealed directory's list of its files, sealed as MANIFEST + SUFFIX
# Directories inside an artifact that keep a manifest of their own: a run's checkpoints, each written (and pruned,
# or left out of a backup) whole, apart from the rest of the run.
OWN_MANIFEST = re.compile(r"^(checkpoints/[^/]+)/")
_RESTORE = "restore the artifact from a backup, or make it again"
# The names a tokenizer's save_pretrained writes (transformers 5): made as in-memory files before it runs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json")


class SealedError(VaultError):
    """A sealed artifact that does not open: altered, moved, cut, or its key is gone."""


# --- keys --------------------------------------------------------------------------------------------
class VaultKeys:
    """Artifact keys in the vault (`artifact_keys`); new ones are made on first write. Beside each key, whether the
    artifact is written with manifests (every key made since they were): one of those without its manifest was
    tampered with, not made before manifests."""

    def __init__(self, vault):
        self.vault = vault
        self._known: dict[str, bytes] = {}  # in memory beside the data key; a detached vault still opens them
        self._manifested: set[str] = set()

    def key(self, artifact: str, create: bool = False) -> bytes:
        with self.vault._lock:
            if artifact in self._known:
                return self._known[artifact]
            if create and self.vault.read_only:
                raise SealedError(f"the vault is open read-only: no key can be made for {artifact}",
                                  "open it for writing to write artifacts")
            with self.vault.session(read_only=self.vault.read_only):  # as is if attached
                con = self.vault.con
                row = con.execute("SELECT key, manifested FROM artifact_keys WHERE artifact = ?",
                                  [artifact]).fetchone()
                if row is None and not create:
                    raise SealedError(f"the vault holds no key for the artifact {artifact}",
                                      "it was not made on this appliance, or its key was removed; restore a backup")
                if row is None:  # a new artifact: written with manifests from its first file
                    key, manifested = os.urandom(32), True
                    con.execute("INSERT INTO artifact_keys (artifact, key, created, manifested) VALUES (?, ?, ?, ?)",
                                [artifact, key, datetime.now(UTC), True])
                else:
                    key, manifested = bytes(row[0]), bool(row[1])
            self._known[artifact] = key
            if manifested:
                self._manifested.add(artifact)
            return key

    def manifested(self, artifact: str) -> bool:
        """Whether the artifact is written with manifests (False: made before them, or its key is not here)."""
        self.key(artifact)
        return artifact in self._manifested

    def mark_manifested(self, artifact: str) -> None:
        """Record that the artifact now has its manifests (an older one rewritten, or found whole by a check)."""
        with self.vault._lock:
            if artifact in self._manifested:
                return
            if self.vault.read_only:
                return  # recorded by the next write or check that has the vault open for writing
            with self.vault.session(read_only=False):
                self.vault.con.execute("UPDATE artifact_keys SET manifested = TRUE WHERE artifact = ?", [artifact])
            self._manifested.add(artifact)

    def forget(self) -> None:
        """Drop the keys held in memory (the vault is closed)."""
        self._known.clear()
        self._manifested.clear()



@dataclass
class GivenKeys:
    """Keys handed over for one job (a training run's ranks): these artifacts only, and which of them are written
    with manifests (handed over with the keys)."""

    keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    with_manifests: set[str] = field(default_factory=set)

    def key(self, artifact: str, create: bool = False) -> bytes:
        if artifact not in self.keys:
            raise SealedError(f"this process was given no key for the artifact {artifact}",
                              "the launcher hands each run the keys of what it writes, and what it reads open")
        return self.keys[artifact]

    def manifested(self, artifact: str) -> bool:
        self.key(artifact)
        return artifact in self.with_manifests

    def mark_manifested(self, artifact: str) -> None:
        self.with_manifests.add(artifact)  # this process only: the vault's holder records it


# --- one file ----------------------------------------------------------------------------------------
def _file_key(key: bytes, nonce: bytes, artifact: str, name: str) -> bytes:
    return stream.hkdf(key, nonce, _INFO + artifact.encode() + b"\x00" + name.encode())


def seal_file(key: bytes, artifact: str, name: str, payload, dest: Path) -> dict:
    """Write `payload` (a buffer) sealed to `dest` (a new file: exclusive, never through a link, 0600). Returns
    its manifest entry."""
    from bundles.safefile import create_new

    with create_new(dest) as f:
        entry = seal_to(f, key, artifact, name, payload)
        f.flush()
        os.fsync(f.fileno())
    return entry


BATCH = 64  # chunks opened at once, in parallel (into the in-memory file: no buffer of its own)


def seal_to(f, key: bytes, artifact: str, name: str, payload) -> dict:
    """Write `payload` sealed to the open binary file `f`. Returns its manifest entry."""
    with SealingWriter(f, key, artifact, name) as w:
        w.write(payload)  # whole chunks sealed straight from the payload
    return w.entry()


class SealingWriter(stream.Writer):
    """A sealed file written front to back to `f` (`stream.Writer`: `write`, `tell` of the plaintext written,
    `close` seals the last chunk, `abandon` when given up), for a writer that streams (a checkpoint's shards)."""

    def __init__(self, f, key: bytes, artifact: str, name: str):
        nonce = self.nonce = os.urandom(NONCE)
        f.write(MAGIC + nonce)
        super().__init__(f, _file_key(key, nonce, artifact, name))

    def flush(self) -> None:  # batches are written as they fill; the rest waits for the last chunk
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def entry(self) -> dict:
        """The file's manifest entry (once closed)."""
        size = self.tell()
        return {"size": size, "sealed": len(MAGIC) + NONCE + stream.sealed_size(size), "nonce": self.nonce.hex()}


def open_file(key: bytes, artifact: str, name: str, src: Path, accept: list[dict] | None = None) -> MemFile:
    """The plaintext of the sealed file `src`, as an in-memory file. `accept`: the manifest entries it may match
    (the copy last written, or one being written), compared on the descriptor that is then read, so a copy
    swapped in after the comparison is never the one opened; None where no manifest covers it."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO does not block it
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealedError(f"{src} is not a sealed artifact file", "it was replaced; restore it from a backup")
        total = st.st_size
        head = os.pread(fd, len(MAGIC) + NONCE, 0)
        if len(head) < len(MAGIC) + NONCE or not head.startswith(MAGIC):
            raise SealedError(f"{src} is not a sealed artifact file", "it was replaced or damaged")
        nonce = head[len(MAGIC):]
        if accept is not None:
            write = [e for e in accept if e["nonce"] == nonce.hex()]  # the nonce names one write of the file
            if not write:
                raise SealedError(f"the artifact {artifact} does not match its manifest: {name} "
                                  f"{'is not the copy last written' if accept else 'was added'}",
                                  f"a file was added or put back from an earlier write; {_RESTORE}")
            if not any(e["sealed"] == total for e in write):
                raise SealedError(f"{src} is cut or extended", "restore the artifact from a backup")
        try:
            size = stream.payload_size(total - len(head))
        except stream.StreamError:
            raise SealedError(f"{src} is cut or extended", "restore the artifact from a backup") from None
        if os.fstat(fd).st_blocks * 512 < total // 2 and total > 1 << 20:  # holes: a size claimed, not written
            raise SealedError(f"{src} is a sparse file", "it was replaced; restore it from a backup")
        out = MemFile(name.rsplit("/", 1)[-1], size)
        try:
            fkey = _file_key(key, nonce, artifact, name)
            n, step = stream.chunks(size), BATCH
            with mmap.mmap(fd, total, prot=mmap.PROT_READ) as m, out.map(write=True) as dst, \
                    memoryview(m) as whole, whole[len(head):] as body, memoryview(dst) as d:
                for first in range(0, n, step):  # a batch at a time: an altered file stops at its first bad batch
                    last = min(first + step, n)
                    with body[first * (stream.CHUNK + stream.TAG):last * (stream.CHUNK + stream.TAG)] as piece, \
                            d[first * stream.CHUNK:min(last * stream.CHUNK, size)] as into:
                        stream.open_into(fkey, piece, into, first, n)
        except stream.StreamError as e:
            out.close()
            raise SealedError(f"{src} does not open: {e}", "it was altered, moved from another artifact or "
                                                            "damaged; restore it from a backup") from None
        except BaseException:
            out.close()
            raise
        return out
    finally:
        os.close(fd)


def is_sealed(path: Path) -> bool:
    """A sealed file, or a directory holding sealed files."""
    path = Path(path)
    if path.name.endswith(SUFFIX):
        return path.is_file()
    return path.is_dir() and not path.is_symlink() and any(
        p.name.endswith(SUFFIX) for p in path.rglob("*" + SUFFIX))


def sealed_names(root: Path) -> list[str]:
    """The plaintext names of the files a sealed directory holds, sorted (not its manifests, nor what lies in a
    hidden directory: one being built under a temp name)."""
    names: list[str] = []

    def walk(d: Path, rel: str) -> None:
        for e in os.scandir(d):
            if e.is_dir(follow_symlinks=False):
                if not e.name.startswith("."):
                    walk(Path(e.path), f"{rel}{e.name}/")
            elif e.name.endswith(SUFFIX) and e.name != MANIFEST + SUFFIX and e.is_file(follow_symlinks=False):
                names.append(rel + e.name[:-len(SUFFIX)])

    if Path(root).is_dir():
        walk(Path(root), "")
    return sorted(names)


# --- manifests ---------------------------------------------------------------------------------------
def entry_of(path: Path) -> dict:
    """The manifest entry of the sealed file `path`, from its header and size."""
    try:  # a link, a FIFO or anything but a regular file in a file's place is not the copy the manifest lists
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return {"size": -1, "sealed": -1, "nonce": ""}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {"size": -1, "sealed": -1, "nonce": ""}
        total = st.st_size
        head = os.pread(fd, len(MAGIC) + NONCE, 0)
    finally:
        os.close(fd)
    try:
        size = stream.payload_size(total - len(MAGIC) - NONCE) if head.startswith(MAGIC) else -1
    except stream.StreamError:
        size = -1
    return {"size": size, "sealed": total, "nonce": head[len(MAGIC):].hex()}


def _same(a: dict, b: dict | None) -> bool:
    return b is not None and (a["sealed"], a["nonce"]) == (b["sealed"], b["nonce"])


def _covered(d: Path) -> tuple[dict[str, Path], list[Path]]:
    """The sealed files a manifest in `d` lists (names relative to `d`), and the directories below with a manifest
    of their own (a checkpoint in a run), which it does not."""
    files: dict[str, Path] = {}
    nested: list[Path] = []

    def walk(cur: Path, rel: str) -> None:
        for e in os.scandir(cur):
            if e.is_dir(follow_symlinks=False):
                if e.name.startswith("."):
                    continue  # a directory being built under a temp name: never opened as part of the artifact
                if os.path.isfile(os.path.join(e.path, MANIFEST + SUFFIX)):
                    nested.append(Path(e.path))
                else:
                    walk(Path(e.path), f"{rel}{e.name}/")
            elif e.name.endswith(SUFFIX) and e.name != MANIFEST + SUFFIX:
                files[rel + e.name[:-len(SUFFIX)]] = Path(e.path)

    walk(d, "")
    return files, nested


def seal_manifest(key: bytes, artifact: str, prefix: str, files: dict[str, dict], write: int, dest: Path,
                  pending: dict[str, dict] | None = None) -> None:
    """Seal the manifest of a directory (`prefix`: its name inside the artifact, "" for the artifact itself) to
    `dest`, replacing it. `pending` holds the entries of files being replaced, accepted until the next write."""
    from bundles.safefile import atomic_create

    doc = {"format": 1, "artifact": artifact, "dir": prefix, "write": write, "id": os.urandom(16).hex(),
           "files": dict(sorted(files.items()))}
    if pending:
        doc["pending"] = pending
    with atomic_create(dest) as f:
        seal_to(f, key, artifact, _join(prefix, MANIFEST), json.dumps(doc, indent=1).encode())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@contextmanager
def _locked(top: Path) -> Iterator[None]:
    """The artifact directory locked against another process updating its manifest meanwhile."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rel(path: Path, top: Path) -> str:
    """`path` relative to `top`, "" for `top` itself."""
    rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(top)).as_posix()
    return "" if rel == "." else rel


def _compare(artifact: str, prefix: str, want: dict, pending: dict, got: dict[str, Path]) -> None:
    """The sealed files `got` against the manifest's entries `want` (and `pending`: a write or removal under way,
    either state accepted); one SealedError naming the artifact and what differs."""
    missing = sorted(n for n in want if n not in got)
    added = sorted(n for n in got if n not in want and n not in pending)
    stale = sorted(n for n in got if (n in want or n in pending) and not (
        _same(entry_of(got[n]), want.get(n)) or _same(entry_of(got[n]), pending.get(n))))
    said = [f"{_join(prefix, n)} {what}" for names, what in (
        (missing, "is missing"), (added, "was added"), (stale, "is not the copy last written")) for n in names]
    if said:
        more = f" (and {len(said) - 3} more)" if len(said) > 3 else ""
        raise SealedError(f"the artifact {artifact} does not match its manifest: {'; '.join(said[:3])}{more}",
                          f"a file was removed, added or put back from an earlier write; {_RESTORE}")


# --- the store ---------------------------------------------------------------------------------------
@dataclass
class Store:
    """The artifacts of one home, and the keys this process holds for them."""

    root: Path  # HOME/artifacts
    tmp: Path  # HOME/tmp: where in-memory directories put their links
    keys: VaultKeys | GivenKeys = field(repr=False)
    # artifacts handed to this process already open (a run's ranks: its base and tokenizer, from the launcher),
    # artifact id -> file name -> frozen in-memory file; read from here, never from the disk, with no key
    handed: dict[str, dict[str, MemFile]] = field(default_factory=dict, repr=False)

    def artifact(self, path: Path) -> str | None:
        """The id of the artifact `path` is (or is in): its top two levels under the root; None outside."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root))
        except ValueError:
            return None
        return "/".join(rel.parts[:2]) if len(rel.parts) >= 2 else None

    def _where(self, path: Path) -> tuple[str, Path]:
        artifact = self.artifact(path)
        if artifact is None:
            raise ApplianceError(f"{path} is not under the artifacts of {self.root.parent}", "a defect: report it")
        return artifact, self.root / artifact

    # reading
    def open_file(self, path: Path) -> MemFile:
        """One file of an artifact (its plaintext name or its `.sealed` name), in memory."""
        path = Path(path)
        sealed = path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)
        if self.artifact(path) in self.handed:
            return self._handed_file(sealed)
        return self.open_checked(sealed, {})

    def open_checked(self, sealed: Path, docs: dict[Path, dict]) -> MemFile:
        """The sealed file `sealed` in memory: altered, cut or moved, it does not open; a whole file of another
        write, or one its manifest does not list, is refused on the descriptor it is read from. `docs` keeps the
        manifests opened so far, for a directory opened file by file."""
        artifact, top = self._where(sealed)
        name = _rel(sealed, top)[:-len(SUFFIX)]
        return open_file(self.keys.key(artifact), artifact, name, sealed, self._accept(artifact, top, sealed, docs))

    def read_bytes(self, path: Path) -> bytes:
        path = Path(path)
        if not path.name.endswith(SUFFIX) and not path.with_name(path.name + SUFFIX).is_file() \
                and os.path.lexists(path):
            _refuse_plain(path)
        with self.open_file(path) as f:
            return f.read()

    @contextmanager
    def opened(self, path: Path, weights: bool = True) -> Iterator[Path]:
        """A path to hand a loader: `path` itself when it is not sealed; else its plaintext in memory (a file
        as `/proc/PID/fd/N`, a directory as a private directory of links; without its weight files when not
        `weights`, for a tokenizer read from a model's directory)."""
        path = Path(path)
        if self.artifact(path) is None:
            yield path
            return
        if self.artifact(path) in self.handed:
            with self._handed_dir(path, weights) as p:
                yield p
            return
        if not (is_sealed(path) or is_sealed(path.with_name(path.name + SUFFIX))):
            if os.path.lexists(path):
                _refuse_plain(path)
            yield path  # missing: the loader says so, naming it
            return
        if not path.is_dir():
            with self.open_file(path) as f:
                yield Path(f.path)
            return
        self.check(path)  # the set of files: none missing or added
        docs: dict[Path, dict] = {}
        with MemDir(self.tmp) as d:
            for name in sealed_names(path):
                if weights or not name.endswith(WEIGHTS):
                    d.add(name, self.open_checked(path / (name + SUFFIX), docs))  # each the copy its manifest lists
            yield d.path

    def hand_over(self, artifact: str) -> dict[str, MemFile]:
        """Every file of an artifact opened into memory, checked against its manifests and frozen read-only (memfd
        seals): what a run's ranks are handed of an artifact they only read, in place of its key (with which they
        could also write it). The caller closes them."""
        top = self.root / artifact
        self.check(top)
        files: dict[str, MemFile] = {}
        docs: dict[Path, dict] = {}
        try:
            for name in sealed_names(top):
                files[name] = self.open_checked(top / (name + SUFFIX), docs)
                files[name].freeze()
        except BaseException:
            for f in files.values():
                f.close()
            raise
        return files

    def _handed_file(self, sealed: Path) -> MemFile:
        artifact, top = self._where(sealed)
        name = _rel(sealed, top)[:-len(SUFFIX)]
        if name not in self.handed[artifact]:
            raise SealedError(f"the artifact {artifact} has no file {name}", "the launcher handed it over without it")
        return self.handed[artifact][name].dup()

    @contextmanager
    def _handed_dir(self, path: Path, weights: bool) -> Iterator[Path]:
        """`opened` of an artifact handed over: a file of it, or a directory of links to its files (under `path`)."""
        artifact, top = self._where(path)
        files, rel = self.handed[artifact], _rel(path, top)
        name = rel[:-len(SUFFIX)] if rel.endswith(SUFFIX) else rel
        if name in files:
            with files[name].dup() as f:
                yield Path(f.path)
            return
        under = {n[len(rel) + 1:] if rel else n: f for n, f in files.items() if not rel or n.startswith(rel + "/")}
        if not under:
            if os.path.lexists(path):
                _refuse_plain(path)  # not handed over, so not the artifact's: never read from the disk
            yield path  # nothing there: the loader says so, naming it
            return
        with MemDir(self.tmp) as d:
            for name, f in under.items():
                if weights or not name.endswith(WEIGHTS):
                    d.add(name, f.dup())
            yield d.path

    def verify(self, path: Path) -> int:
        """Open every sealed file of an artifact (in memory, then dropped): the number of bytes checked."""
        _, top = self._where(path)
        n, docs = 0, {}
        with _locked(top):  # its manifests read once for all its files: no write of the artifact meanwhile
            for name in sealed_names(top):
                with self.open_checked(top / (name + SUFFIX), docs) as f:
                    n += f.size
        return n

    def tree_hash(self, path: Path) -> str:
        """The content hash of an artifact directory's plaintext: sha256 over (name, file sha256), sorted —
        what `train.model.tree_hash` gives for the same files in the clear."""
        self.check(path)
        h, docs = hashlib.sha256(), {}
        for name in sealed_names(path):
            with self.open_checked(path / (name + SUFFIX), docs) as f, f.map() as m:
                h.update(f"{name}\0{hashlib.sha256(m).hexdigest()}\n".encode())
        return h.hexdigest()

    # writing
    def write_dir(self, dest: Path, files: dict[str, MemFile | bytes | Path]) -> str:
        """Seal `files` (name -> in-memory file, bytes, or a staged plain file) as the directory `dest`, built
        under a temp name and renamed into place whole. Returns the content hash of the plaintext (`tree_hash`)."""
        from appliance.home import atomic_dir

        artifact, top = self._where(dest)
        if Path(os.path.abspath(dest)) != Path(os.path.abspath(top)):
            raise ApplianceError(f"{dest} is inside the artifact {artifact}", "a defect: report it")
        key = self.keys.key(artifact, create=True)
        h = hashlib.sha256()
        entries: dict[str, dict] = {}
        with atomic_dir(dest) as tmp:
            for name in sorted(files):
                f = files[name]
                (tmp / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                opened = f.map() if isinstance(f, MemFile) else _mapped(f) if isinstance(f, Path) else _Buffer(f)
                with opened as data:
                    digest = hashlib.sha256(data).hexdigest()
                    h.update(f"{name}\0{digest}\n".encode())
                    entries[name] = {**seal_file(key, artifact, name, data, tmp / (name + SUFFIX)), "sha256": digest}
            groups: dict[str, dict[str, dict]] = {}
            for name, entry in entries.items():  # a checkpoint has a manifest of its own, wherever it is written
                own = OWN_MANIFEST.match(name)
                sub = own.group(1) if own else ""
                groups.setdefault(sub, {})[name[len(sub) + 1:] if sub else name] = entry
            for sub, listed in groups.items():  # last: the directory is renamed into place with them
                seal_manifest(key, artifact, sub, listed, self._write_count(artifact, top, top / sub) + 1,
                              tmp / sub / (MANIFEST + SUFFIX))
        self.keys.mark_manifested(artifact)  # an older artifact rewritten (`vault seal`) now has its manifests
        return h.hexdigest()

    def write_file(self, dest: Path, data: bytes) -> None:
        """One sealed file inside an existing artifact directory (a report beside its run), replacing it."""
        from bundles.safefile import atomic_create

        artifact, top = self._where(dest)
        dest = Path(os.path.abspath(dest))
        name = dest.relative_to(top).as_posix()
        key = self.keys.key(artifact, create=True)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = Path(str(dest) + SUFFIX)
        with _locked(top):
            mdir = self._covering(top, dest.parent)
            doc = self._manifest(artifact, top, mdir) if mdir else None
            if doc is None and set(_covered(top)[0]) <= {name}:  # a new artifact: its first file starts a manifest
                mdir, doc = top, {"files": {}, "write": 0}
                self.keys.mark_manifested(artifact)
            if mdir is None or doc is None:  # an artifact made before manifests: left as it was
                self._need_no_manifest(artifact, _rel(dest.parent, top))
                with atomic_create(target) as f:
                    seal_to(f, key, artifact, name, data)
                return
            prefix, mname, mpath = _rel(mdir, top), _rel(dest, mdir), mdir / (MANIFEST + SUFFIX)
            with atomic_create(target) as f:
                entry = {**seal_to(f, key, artifact, name, data), "sha256": hashlib.sha256(data).hexdigest()}
                files = {**doc["files"], mname: entry}
                # before the rename: the set as it was, the new copy pending, so whichever state the process dies
                # in opens (a file new to the artifact included)
                seal_manifest(key, artifact, prefix, doc["files"], doc["write"] + 1, mpath, {mname: entry})
            seal_manifest(key, artifact, prefix, files, doc["write"] + 2, mpath)

    def remove(self, path: Path) -> None:
        """Remove a directory inside an artifact (a pruned checkpoint), and its files from the manifest that lists
        them."""

        artifact, top = self._where(path)
        path = Path(os.path.abspath(path))
        with _locked(top):
            mdir = None if (path / (MANIFEST + SUFFIX)).is_file() else self._covering(top, path.parent)
            doc = self._manifest(artifact, top, mdir) if mdir else None
            if doc is None:
                discard(path)
                return
            sub, key = _rel(path, mdir) + "/", self.keys.key(artifact)
            prefix, mpath = _rel(mdir, top), mdir / (MANIFEST + SUFFIX)
            gone = {n: e for n, e in doc["files"].items() if n.startswith(sub)}
            files = {n: e for n, e in doc["files"].items() if n not in gone}
            seal_manifest(key, artifact, prefix, files, doc["write"] + 1, mpath, gone)  # either state checks
            discard(path)
            seal_manifest(key, artifact, prefix, files, doc["write"] + 2, mpath)

    def seal_manifest_of(self, tmp: Path, final: Path) -> None:
        """The manifest of a directory built in `tmp` (a checkpoint) that is renamed to `final` inside an artifact:
        every sealed file it holds, written last into `tmp`."""
        artifact, top = self._where(final)
        final = Path(os.path.abspath(final))
        files, _ = _covered(tmp)
        seal_manifest(self.keys.key(artifact), artifact, _rel(final, top), {n: entry_of(p) for n, p in files.items()},
                      self._write_count(artifact, top, final) + 1, tmp / (MANIFEST + SUFFIX))

    # manifests
    def _covering(self, top: Path, d: Path) -> Path | None:
        """The nearest directory from `d` up to the artifact `top` that holds a manifest."""
        cur, top = Path(os.path.abspath(d)), Path(os.path.abspath(top))
        while True:
            if (cur / (MANIFEST + SUFFIX)).is_file():
                return cur
            if cur == top or top not in cur.parents:
                return None
            cur = cur.parent

    def _manifest(self, artifact: str, top: Path, d: Path) -> dict | None:
        """The manifest of directory `d` of an artifact, opened (None when there is none)."""
        f = Path(d) / (MANIFEST + SUFFIX)
        if not f.is_file():
            return None
        name = _join(_rel(d, top), MANIFEST)
        try:
            with open_file(self.keys.key(artifact), artifact, name, f) as m:
                doc = json.loads(m.read())
            doc["files"], doc["write"] = dict(doc["files"]), int(doc["write"])
        except SealedError:
            raise SealedError(f"the manifest of the artifact {artifact} ({name}) does not open",
                              f"it was altered, or put there from another directory; {_RESTORE}") from None
        except (ValueError, KeyError, TypeError):
            raise SealedError(f"the manifest of the artifact {artifact} ({name}) is malformed", _RESTORE) from None
        return doc

    def _need_no_manifest(self, artifact: str, where: str) -> None:
        """Sealed files that no manifest covers: an artifact made before manifests opens as before; one the vault
        records as written with manifests had its manifest deleted (then any file of it may be removed or swapped)."""
        if self.keys.manifested(artifact):
            at = f" (in {where})" if where else ""
            raise SealedError(f"the manifest of the artifact {artifact} is missing{at}: the vault records it was "
                              "written with one, so its files may have been removed or swapped", _RESTORE)

    def _write_count(self, artifact: str, top: Path, d: Path) -> int:
        """The write counter of the manifest `d` holds now (0 when none, or it does not open: it is replaced)."""
        try:
            doc = self._manifest(artifact, top, d) if Path(d).is_dir() else None
        except SealedError:
            return 0
        return doc["write"] if doc else 0

    def check(self, path: Path) -> bool:
        """Check a sealed directory (an artifact, or a directory inside one) against its manifests: a file missing,
        added, or not the copy last written raises a SealedError naming the artifact. False when some of it has no
        manifest (made before manifests: it opens as before), else True."""
        artifact, top = self._where(path)
        if artifact in self.handed:
            return True  # checked by the process that opened it and handed it over
        d, top = Path(os.path.abspath(path)), Path(os.path.abspath(top))
        mdir = self._covering(top, d)
        files, nested = _covered(d)
        whole = True
        if mdir is None:
            if files:
                self._need_no_manifest(artifact, _rel(d, top))
            whole = not files
        else:
            doc = self._manifest(artifact, top, mdir)
            sub = _rel(d, mdir)
            cut = len(sub) + 1 if sub else 0

            def under(entries: dict) -> dict:
                return {n[cut:]: e for n, e in entries.items() if not sub or n.startswith(sub + "/")}

            _compare(artifact, _rel(d, top), under(doc["files"]), under(doc.get("pending") or {}), files)
        for n in nested:
            whole = self.check(n) and whole
        return whole

    def _accept(self, artifact: str, top: Path, sealed_path: Path, docs: dict[Path, dict]) -> list[dict] | None:
        """The entries the manifest covering a file lists for it (the copy last written, and one being written):
        none when it lists none; None when no manifest covers it (made before manifests: opened as before)."""
        mdir = self._covering(top, sealed_path.parent)
        if mdir is None:
            self._need_no_manifest(artifact, _rel(sealed_path.parent, top))
            return None
        if mdir not in docs:
            docs[mdir] = self._manifest(artifact, top, mdir)
        doc, name = docs[mdir], _rel(sealed_path, mdir)[:-len(SUFFIX)]
        return [e for e in (doc["files"].get(name), (doc.get("pending") or {}).get(name)) if e]

    @contextmanager
    def building(self, dest: Path, names: tuple[str, ...] = ()) -> Iterator[MemDir]:
        """An in-memory directory to save into (`names` are made as empty in-memory files first, for a library
        that saves by path); when the block ends, everything written is sealed as `dest`."""
        with MemDir(self.tmp) as d:
            for n in names:
                d.new(n)
            yield d
            files = {n: f for n, f in d.check().items() if f.size or n not in names}
            d.content_hash = self.write_dir(dest, files)


@contextmanager
def _mapped(path: Path):
    """A plain file's bytes, mapped (a staged import: never read whole into memory)."""
    with open(path, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            yield m


class _Buffer:
    def __init__(self, data: bytes):
        self.data = data

    def __enter__(self):
        return self.data

    def __exit__(self, *exc) -> None:
        pass


def store(vault) -> Store:
    """The store of an open vault's home, with the vault's keys."""
    return Store(vault.home.artifacts, vault.home.tmp, VaultKeys(vault))


# --- the stores this process holds ---------------------------------------------------------------------
# An open vault registers its home's store; a training rank registers the keys its launcher handed it. Code
# that loads or saves an artifact finds the store by the artifact's path, so two homes open in one process
# (tests, an agent server) each use their own keys.
_STORES: dict[str, list[Store]] = {}


def register(s: Store) -> Store:
    stores = _STORES.setdefault(os.path.abspath(s.root), [])
    if s not in stores:
        stores.append(s)
    return s


def unregister(s: Store) -> None:
    """This store only: another handle on the same home keeps its own registration."""
    stores = _STORES.get(os.path.abspath(s.root), [])
    if s in stores:
        stores.remove(s)


def store_for(path: Path) -> Store | None:
    """The registered store whose artifacts hold `path` (the newest registered of that home), or None."""
    p = os.path.abspath(path)
    for root, stores in list(_STORES.items()):
        if stores and (p == root or p.startswith(root + os.sep)):
            return stores[-1]
    return None


def home_artifacts(path: Path) -> Path | None:
    """The `artifacts/` directory of a home (a directory with a keyring) that holds `path`, or None. Whether a
    file must be sealed is decided by where it is, never by whether a store happens to be registered."""
    p = Path(os.path.abspath(path))
    for d in [p, *p.parents]:
        if d.name == "artifacts" and (d.parent / "keyring.json").is_file():
            return d
    return None


def _refuse_plain(path: Path) -> None:
    """A file or directory in the clear where only sealed ones may be: never loaded (a planted checkpoint would
    run code as it unpickles), named instead."""
    raise SealedError(f"{path} is in the clear inside the home's artifacts",
                      "nothing there is read unsealed: run `appliance vault seal` if an older appliance made it, "
                      "else remove it")


def need(path: Path) -> Store:
    s = store_for(path)
    if s is None:
        raise SealedError(f"{path} is a sealed artifact and its vault is not open in this process",
                          "open the vault first (a defect if you see this from an appliance command)")
    return s


@contextmanager
def opened(path: Path, weights: bool = True) -> Iterator[Path]:
    """`Store.opened` with the store that holds `path`. Outside every home's artifacts a path is used as it is;
    inside, only sealed files open (with the home's vault open here), and anything in the clear is refused."""
    path = Path(path)
    if home_artifacts(path) is None:
        yield path
        return
    with need(path).opened(path, weights) as p:
        yield p


@contextmanager
def named(opened_path: Path, label: str) -> Iterator[None]:
    """Errors raised in the block name `label` (a model's id) where they would name `opened_path`, the in-memory
    directory `opened` gave, or one of its files by its `/proc/PID/fd/N` path: names that mean nothing to a user
    and are gone once the block ends."""
    try:
        yield
    except ApplianceError as e:
        said = [(str(opened_path), label)]
        if Path(opened_path).is_dir():
            for dirpath, _, filenames in os.walk(opened_path):
                for n in filenames:
                    link = Path(dirpath, n)
                    if link.is_symlink():
                        said.append((os.readlink(link), f"{label}/{link.relative_to(opened_path).as_posix()}"))
        said.sort(key=lambda pair: -len(pair[0]))  # a file's link before the directory it is in
        message, hint = e.message, e.hint
        for was, now in said:
            message = message.replace(was, now)
            hint = hint.replace(was, now) if hint else hint
        if (message, hint) != (e.message, e.hint):
            e.message, e.hint = message, hint
            e.args = (f"{message}; {hint}" if hint else message,)
        raise


def read_bytes(path: Path) -> bytes:
    """One file's plaintext: sealed inside a home's artifacts (its vault open here), else read as it is."""
    path = Path(path)
    if home_artifacts(path) is None:
        return path.read_bytes()
    return need(path).read_bytes(path)


def exists(path: Path) -> bool:
    """Whether a file of an artifact exists, sealed or not."""
    path = Path(path)
    return path.is_file() or Path(str(path) + SUFFIX).is_file()


@contextmanager
def building(dest: Path, names: tuple[str, ...] = ()) -> Iterator[MemDir]:
    """`Store.building` with the store that holds `dest`."""
    with need(dest).building(dest, names) as d:
        yield d


def write_dir(dest: Path, files: dict) -> str:
    return need(dest).write_dir(dest, files)


def write_file(dest: Path, data: bytes) -> None:
    need(dest).write_file(dest, data)


def discard(path: Path) -> None:
    """Remove a directory inside an artifact whole or not at all: renamed first to a hidden name beside it (which
    no reader sees), then deleted. A crash part-way through deleting leaves only the hidden copy, never a directory
    missing some of its files."""
    import shutil
    import tempfile

    from appliance.home import fsync_path

    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.gone-", dir=path.parent))
    os.replace(path, aside / path.name)
    fsync_path(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def planted(store: Store, top: Path) -> bool:
    """Whether files in the clear inside the artifact directory `top` can only have been put there by hand: the
    artifact was written sealed, with manifests (the vault records it, or a manifest lies in it). Such files are
    never loaded, and never sealed into it: a planted checkpoint would otherwise be unpickled on resume."""
    artifact, _ = store._where(top)
    try:
        if store.keys.manifested(artifact):
            return True
    except SealedError:  # no key: made before artifacts were sealed
        return False
    return any(Path(top).rglob(MANIFEST + SUFFIX))


def seal_plain(store: Store, top: Path) -> int:
    """Seal the files in the clear of the artifact directory `top` (made by an appliance before artifacts were
    sealed), keeping what is sealed already; the directory is replaced whole. Returns the bytes sealed."""
    artifact, _ = store._where(top)
    plain = {p.relative_to(top).as_posix(): p for p in sorted(top.rglob("*"))
             if p.is_file() and not p.is_symlink() and not p.name.endswith(SUFFIX)
             and not any(part.startswith(".") for part in p.relative_to(top).parts[:-1])}
    if not plain:
        return 0
    if planted(store, top):
        raise SealedError(f"the artifact {artifact} was written sealed, with manifests: its {len(plain)} file(s) in "
                          f"the clear ({next(iter(plain))}) were put there by hand, and are never sealed into it",
                          "they are never loaded; remove them, or restore the artifact from a backup")
    store.check(top)  # what is sealed already is kept as it is: never a file removed, added or rolled back
    size = sum(p.stat().st_size for p in plain.values())
    store.keys.key(artifact, create=True)
    docs: dict[Path, dict] = {}
    opened = {n: store.open_checked(top / (n + SUFFIX), docs) for n in sealed_names(top)}
    try:
        store.write_dir(top, {**plain, **opened})
    finally:
        for f in opened.values():
            f.close()
    return size or 1  # an artifact of empty files was still sealed


class Receiving:
    """An artifact directory received file by file as a stream (a bundle being imported): each file sealed as
    its bytes arrive, under a temp name beside `dest`, renamed into place whole by `publish()` once the sender's
    bundle checked, removed by `discard()` otherwise. Nothing of it is held in memory or written in the clear."""

    def __init__(self, store: Store, dest: Path):
        import tempfile

        self.store, self.dest = store, Path(dest)
        self.artifact, top = store._where(dest)
        if Path(os.path.abspath(dest)) != Path(os.path.abspath(top)):
            raise ApplianceError(f"{dest} is inside the artifact {self.artifact}", "a defect: report it")
        self.key = store.keys.key(self.artifact, create=True)
        self.dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=self.dest.parent))
        self.entries: dict[str, dict] = {}  # for the manifest, written last
        self._writers: list[SealingWriter] = []

    def file(self, name: str):
        from bundles.safefile import create_new

        path = self.tmp / (name + SUFFIX)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        f = create_new(path)
        w = SealingWriter(f, self.key, self.artifact, name)
        self._writers.append(w)
        entries, writers = self.entries, self._writers

        class _Sink:
            def write(self, data) -> None:
                w.write(data)

            def close(self) -> None:
                w.close()
                f.flush()
                os.fsync(f.fileno())
                f.close()
                entries[name] = w.entry()
                writers.remove(w)  # written whole: nothing left to abandon

        return _Sink()

    def publish(self) -> None:
        from appliance.home import fsync_path

        if os.path.lexists(self.dest):
            raise ApplianceError(f"{self.dest} appeared meanwhile", "import again")
        seal_manifest(self.key, self.artifact, "", self.entries, 1, self.tmp / (MANIFEST + SUFFIX))
        os.rename(self.tmp, self.dest)
        fsync_path(self.dest.parent)
        self.store.keys.mark_manifested(self.artifact)

    def discard(self) -> None:
        import shutil

        for w in self._writers:  # a file given up part-way may still have a batch being written
            w.abandon()
        shutil.rmtree(self.tmp, ignore_errors=True)
