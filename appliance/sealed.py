"""Sealed artifacts: every file under HOME/artifacts is stored encrypted and opened only in memory.

Models, adapters, tokenizers, checkpoints, GGUF files and reports derive from vault data, so they are kept
as sealed as the data. An artifact is a directory (`models/NAME@K`, `gguf/NAME@K-TYPE`, `runs/ID`, ...);
its id is that path under `artifacts/`. Each artifact has a random 256-bit key, kept in the vault's
`artifact_keys` table: only the data key's holder can read it, a `vault rekey` re-encrypts it with the rest
of the database (so rekey costs nothing per artifact), and a training run's ranks are handed the keys of
the artifacts they read and write, never the vault's.

A sealed file is `NAME.sealed`: MAGIC, a random 16-byte nonce, then the file's bytes as a STREAM
(`bundles.stream`: ChaCha20-Poly1305, 1 MiB chunks, sealed and opened on every core) under
HKDF(artifact key, nonce, artifact id + file name). The id and name in the key bind a file to its place:
moved into another artifact or renamed, it does not open; cut, extended or altered, it does not open.

Reading never writes plaintext: `Store.opened(path)` gives a path for a loader (transformers, llama.cpp,
safetensors) that points into memory (`memfiles`): a sealed file becomes an anonymous in-memory file, a
sealed directory a private directory of links to them. Writing builds the files in memory (`Store.building`)
and seals each one into a directory renamed into place whole. A path outside the artifacts (an operator's
own directory given on the command line) is used as it is.
"""

from __future__ import annotations

import hashlib
import mmap
import os
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
# The names a tokenizer's save_pretrained writes (transformers 5): made as in-memory files before it runs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json")


class SealedError(VaultError):
    """A sealed artifact that does not open: altered, moved, cut, or its key is gone."""


# --- keys --------------------------------------------------------------------------------------------
class VaultKeys:
    """Artifact keys in the vault (`artifact_keys`); new ones are made on first write."""

    def __init__(self, vault):
        self.vault = vault
        self._known: dict[str, bytes] = {}  # in memory beside the data key; a detached vault still opens them

    def key(self, artifact: str, create: bool = False) -> bytes:
        with self.vault._lock:
            if artifact in self._known:
                return self._known[artifact]
            if create and self.vault.read_only:
                raise SealedError(f"the vault is open read-only: no key can be made for {artifact}",
                                  "open it for writing to write artifacts")
            with self.vault.session(read_only=self.vault.read_only):  # as is if attached
                con = self.vault.con
                row = con.execute("SELECT key FROM artifact_keys WHERE artifact = ?", [artifact]).fetchone()
                if row is None and not create:
                    raise SealedError(f"the vault holds no key for the artifact {artifact}",
                                      "it was not made on this appliance, or its key was removed; restore a backup")
                if row is None:
                    key = os.urandom(32)
                    con.execute("INSERT INTO artifact_keys VALUES (?, ?, ?)", [artifact, key, datetime.now(UTC)])
                else:
                    key = bytes(row[0])
            self._known[artifact] = key
            return key

    def forget(self) -> None:
        """Drop the keys held in memory (the vault is closed)."""
        self._known.clear()



@dataclass
class GivenKeys:
    """Keys handed over for one job (a training run's ranks): these artifacts only."""

    keys: dict[str, bytes] = field(default_factory=dict, repr=False)

    def key(self, artifact: str, create: bool = False) -> bytes:
        if artifact not in self.keys:
            raise SealedError(f"this process was given no key for the artifact {artifact}",
                              "the launcher hands each run the keys of what it reads and writes")
        return self.keys[artifact]


# --- one file ----------------------------------------------------------------------------------------
def _file_key(key: bytes, nonce: bytes, artifact: str, name: str) -> bytes:
    return stream.hkdf(key, nonce, _INFO + artifact.encode() + b"\x00" + name.encode())


def seal_file(key: bytes, artifact: str, name: str, payload, dest: Path) -> None:
    """Write `payload` (a buffer) sealed to `dest` (a new file: exclusive, never through a link, 0600)."""
    from bundles.safefile import create_new

    with create_new(dest) as f:
        seal_to(f, key, artifact, name, payload)
        f.flush()
        os.fsync(f.fileno())


BATCH = 64  # chunks sealed at once (in parallel) before they are written: memory stays at 64 MiB a file


def seal_to(f, key: bytes, artifact: str, name: str, payload) -> None:
    """Write `payload` sealed to the open binary file `f`."""
    w = SealingWriter(f, key, artifact, name)
    w.write(payload)  # whole batches sealed straight from the payload
    w.close()


class SealingWriter:
    """A sealed file written front to back (`write`, `tell` of the plaintext written, `close` seals the last
    chunk), for a writer that streams (a checkpoint's shards); batches of chunks are sealed in parallel."""

    def __init__(self, f, key: bytes, artifact: str, name: str):
        nonce = os.urandom(NONCE)
        self._key = _file_key(key, nonce, artifact, name)
        self._f = f
        self._buf = bytearray()
        self._n = 0
        self._size = 0
        self._done = False
        self._out = bytearray()
        f.write(MAGIC + nonce)

    def write(self, data) -> int:
        """Whole batches are sealed straight from `data`; only a remainder is copied and kept for the next write
        (at least one byte always stays back: the last chunk must be flagged)."""
        whole = BATCH * stream.CHUNK
        with memoryview(data) as v0, v0.cast("B") as view:
            n, pos = len(view), 0
            self._size += n
            if self._buf:
                with view[:whole - len(self._buf)] as top:
                    self._buf += top
                    pos = len(top)
                if len(self._buf) == whole and pos < n:  # more follows: the buffered batch is not the last
                    self._emit(self._buf, last=False)
                    self._buf = bytearray()
            while n - pos > whole:
                with view[pos:pos + whole] as piece:
                    self._emit(piece, last=False)
                pos += whole
            if pos < n:
                with view[pos:] as rest:
                    self._buf += rest
        return n

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:  # batches are written as they fill; the rest waits for the last chunk
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._done

    def _emit(self, piece, last: bool) -> None:
        k = -(-len(piece) // stream.CHUNK) or 1
        n = len(piece) + k * stream.TAG
        if len(self._out) < n:
            self._out = bytearray(n)
        with memoryview(self._out) as o, o[:n] as out:
            stream.seal_into(self._key, piece, out, self._n, self._n + k if last else self._n + k + 1)
            self._f.write(out)
        self._n += k

    def close(self) -> None:
        if not self._done:
            self._emit(self._buf, last=True)
            self._buf = bytearray()
            self._done = True


def open_file(key: bytes, artifact: str, name: str, src: Path) -> MemFile:
    """The plaintext of the sealed file `src`, as an in-memory file."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        total = os.fstat(fd).st_size
        head = os.pread(fd, len(MAGIC) + NONCE, 0)
        if len(head) < len(MAGIC) + NONCE or not head.startswith(MAGIC):
            raise SealedError(f"{src} is not a sealed artifact file", "it was replaced or damaged")
        nonce = head[len(MAGIC):]
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
    """The plaintext names of the files a sealed directory holds, sorted."""
    return sorted(p.relative_to(root).as_posix()[:-len(SUFFIX)] for p in root.rglob("*" + SUFFIX)
                  if p.is_file() and not p.is_symlink())


# --- the store ---------------------------------------------------------------------------------------
@dataclass
class Store:
    """The artifacts of one home, and the keys this process holds for them."""

    root: Path  # HOME/artifacts
    tmp: Path  # HOME/tmp: where in-memory directories put their links
    keys: VaultKeys | GivenKeys = field(repr=False)

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
        artifact, top = self._where(sealed)
        name = sealed.relative_to(top).as_posix()[:-len(SUFFIX)]
        return open_file(self.keys.key(artifact), artifact, name, sealed)

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
        if not (is_sealed(path) or is_sealed(path.with_name(path.name + SUFFIX))):
            if os.path.lexists(path):
                _refuse_plain(path)
            yield path  # missing: the loader says so, naming it
            return
        if not path.is_dir():
            with self.open_file(path) as f:
                yield Path(f.path)
            return
        artifact, top = self._where(path)
        key = self.keys.key(artifact)
        with MemDir(self.tmp) as d:
            for name in sealed_names(path):
                if weights or not name.endswith(WEIGHTS):
                    rel = (path / name).relative_to(top).as_posix()
                    d.add(name, open_file(key, artifact, rel, path / (name + SUFFIX)))
            yield d.path

    def verify(self, path: Path) -> int:
        """Open every sealed file of an artifact (in memory, then dropped): the number of bytes checked."""
        artifact, top = self._where(path)
        key = self.keys.key(artifact)
        n = 0
        for name in sealed_names(top):
            with open_file(key, artifact, name, top / (name + SUFFIX)) as f:
                n += f.size
        return n

    def tree_hash(self, path: Path) -> str:
        """The content hash of an artifact directory's plaintext: sha256 over (name, file sha256), sorted —
        what `train.model.tree_hash` gives for the same files in the clear."""
        artifact, top = self._where(path)
        key = self.keys.key(artifact)
        h = hashlib.sha256()
        for name in sealed_names(path):
            rel = (path / name).relative_to(top).as_posix()
            with open_file(key, artifact, rel, path / (name + SUFFIX)) as f, f.map() as m:
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
        with atomic_dir(dest) as tmp:
            for name in sorted(files):
                f = files[name]
                (tmp / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                opened = f.map() if isinstance(f, MemFile) else _mapped(f) if isinstance(f, Path) else _Buffer(f)
                with opened as data:
                    h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
                    seal_file(key, artifact, name, data, tmp / (name + SUFFIX))
        return h.hexdigest()

    def write_file(self, dest: Path, data: bytes) -> None:
        """One sealed file inside an existing artifact directory (a report beside its run), replacing it."""
        from bundles.safefile import atomic_create

        artifact, top = self._where(dest)
        name = Path(dest).relative_to(top).as_posix()
        key = self.keys.key(artifact, create=True)
        Path(dest).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_create(Path(str(dest) + SUFFIX)) as f:
            seal_to(f, key, artifact, name, data)

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


def seal_plain(store: Store, top: Path) -> int:
    """Seal the files in the clear of the artifact directory `top` (made by an appliance before artifacts were
    sealed), keeping what is sealed already; the directory is replaced whole. Returns the bytes sealed."""
    artifact, _ = store._where(top)
    plain = {p.relative_to(top).as_posix(): p for p in sorted(top.rglob("*"))
             if p.is_file() and not p.is_symlink() and not p.name.endswith(SUFFIX)}
    if not plain:
        return 0
    size = sum(p.stat().st_size for p in plain.values())
    key = store.keys.key(artifact, create=True)
    opened = {n: open_file(key, artifact, n, top / (n + SUFFIX)) for n in sealed_names(top)}
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

    def file(self, name: str):
        from bundles.safefile import create_new

        path = self.tmp / (name + SUFFIX)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        f = create_new(path)
        w = SealingWriter(f, self.key, self.artifact, name)

        class _Sink:
            def write(self, data) -> None:
                w.write(data)

            def close(self) -> None:
                w.close()
                f.flush()
                os.fsync(f.fileno())
                f.close()

        return _Sink()

    def publish(self) -> None:
        from appliance.home import fsync_path

        if os.path.lexists(self.dest):
            raise ApplianceError(f"{self.dest} appeared meanwhile", "import again")
        os.rename(self.tmp, self.dest)
        fsync_path(self.dest.parent)

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
