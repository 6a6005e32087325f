"""Resumable checkpoints: sharded model and optimizer state, step and RNG, written atomically.

Layout under a run directory: `checkpoints/step-00000040/` holding the `torch.distributed.checkpoint` files
(`__R_0.distcp`, one per rank that holds data, and `.metadata`), `rng.pt` and `state.json`. Every rank writes
its own shard (under FSDP2 its part of every weight and AdamW moment; DDP replicas are written once), and on
resume every rank reads only the pieces its own shard needs, on any number of processes: the checkpoint is
resharded on load, so a run may resume with a different number of processes. Nothing is gathered into one
process (the final model export alone gathers full weights). Only the trainable weights are kept (adapters
alone for LoRA).

A checkpoint is written to a hidden temp directory beside its final name (rank 0 makes it and tells the
others), fsynced and renamed by rank 0 once every rank's shard is in, with `state.json` written last; so a
kill at any moment leaves either the previous checkpoints or the new one, never a half-written one.
Checkpoints of earlier versions (`model.pt` + `optimizer.pt`, full state dicts) still load.

Several nodes: every rank writes its own shard (under HSDP one replica's ranks, whichever node they are on),
so the run directory must be on storage every node mounts at the same path; a rank that cannot see the
temp directory rank 0 made stops every rank with that reason before anything is written.

Under a home's artifacts every file of a checkpoint is sealed (`appliance.sealed`) with the run's key, which
the launcher hands each rank: the shards go through `SealedFS`, a `torch.distributed.checkpoint` file
system whose streams seal as they are written (bound to the checkpoint's final name, so a shard moved to
another step does not open) and open into memory when read. Rank 0 writes the checkpoint's sealed manifest
last, before the rename; loading checks the directory against it, so a shard removed, added or put back from
an earlier write of the same step does not load. The plain layout above is what a checkpoint outside the
artifacts looks like.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from appliance import sealed
from appliance.home import fsync_path

PREFIX = "step-"


def _sealed_fs():
    from torch.distributed.checkpoint.filesystem import FileSystem

    class SealedFS(FileSystem):
        """The files of one checkpoint, sealed; each bound to `final` (the checkpoint's name) and its own name."""

        def __init__(self, store: sealed.Store, final: Path):
            super().__init__()
            self.store = store
            self.artifact, top = store._where(final)
            self.key = store.keys.key(self.artifact)
            self.prefix = final.relative_to(top).as_posix()
            self._docs: dict[Path, dict] = {}  # the checkpoint's manifest, opened once for all its files
            self._written: dict[str, dict] = {}  # path -> the entry of the file this process wrote there

        def _name(self, path) -> str:
            return f"{self.prefix}/{Path(path).name}"

        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            from bundles.safefile import create_new

            path = Path(path)
            if "r" in mode:
                if not _sealed(path).is_file():
                    raise sealed.SealedError(f"{path} is missing or in the clear", "the checkpoint is damaged")
                with self.store.open_checked(_sealed(path), self._docs) as mf, open(mf.path, "rb") as f:
                    yield f
                return
            with create_new(_sealed(path)) as f:
                with sealed.SealingWriter(f, self.key, self.artifact, self._name(path)) as w:
                    yield w  # the block done, every batch is written before the file closes
                f.flush()
                os.fsync(f.fileno())
            self._written[str(path)] = w.entry()

        def rename(self, path, new_path) -> None:  # the name is bound: seal again under the new one
            # only the copy this process wrote there (an earlier one linked in its place is not it)
            written = self._written.pop(str(path), None)
            with sealed.open_file(self.key, self.artifact, self._name(path), _sealed(Path(path)),
                                  [written] if written else []) as mf, mf.map() as data:
                sealed.seal_file(self.key, self.artifact, self._name(new_path), data, _sealed(Path(new_path)))
            _sealed(Path(path)).unlink()

        def exists(self, path) -> bool:
            return _sealed(Path(path)).exists()

        def rm_file(self, path) -> None:
            _sealed(Path(path)).unlink()

        def ls(self, path) -> list[str]:
            return [str(p)[:-len(sealed.SUFFIX)] for p in Path(path).iterdir() if p.name.endswith(sealed.SUFFIX)]

    return SealedFS


def _sealed(path: Path) -> Path:
    return path.with_name(path.name + sealed.SUFFIX)


def _writer(tmp: Path, final: Path):
    """The storage writer for a checkpoint being built in `tmp`: sealed under a store, plain elsewhere."""
    from torch.distributed.checkpoint import FileSystemWriter

    w = FileSystemWriter(str(tmp))
    if sealed.home_artifacts(final) is not None:  # by where it goes: a home's artifacts are sealed, always
        w.fs = _sealed_fs()(sealed.need(final), final)
        w.sync_files = False  # each sealed file is fsynced as it closes
    return w


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    r = FileSystemReader(str(path))
    if sealed.home_artifacts(path) is not None:  # only sealed files are read there (a planted .metadata unpickles)
        if not _sealed(path / ".metadata").is_file():
            raise sealed.SealedError(f"{path} holds no sealed checkpoint", "the checkpoint is damaged or planted")
        sealed.need(path).check(path)  # its files are the ones last written: none removed, added or put back
        r.fs = _sealed_fs()(sealed.need(path), path)
    return r


@contextlib.contextmanager
def _said_plainly():
    """A sealed shard that does not open fails inside torch.distributed.checkpoint, which wraps every rank's
    error in one exception with tracebacks: the operator gets the appliance's own line instead."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, sealed.SealedError):
                raise inner from None
        raise


def _put(tmp: Path, final: Path, name: str, data: bytes) -> None:
    if sealed.home_artifacts(final) is None:
        (tmp / name).write_bytes(data)
        return
    store = sealed.need(final)
    artifact, top = store._where(final)
    sealed.seal_file(store.keys.key(artifact), artifact, f"{final.relative_to(top).as_posix()}/{name}", data,
                     _sealed(tmp / name))


def _get(path: Path, name: str) -> bytes:
    if sealed.home_artifacts(path) is None:
        return (path / name).read_bytes()
    store = sealed.need(path)
    if not _sealed(path / name).exists():
        raise sealed.SealedError(f"{path / name} is missing or in the clear", "the checkpoint is damaged")
    store.check(path)
    with store.open_checked(_sealed(path / name), {}) as mf:  # the copy the manifest lists, checked on what is read
        return mf.read()


def _options(full: bool = False, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, **kw)


def distributed() -> bool:
    """Whether a process group is up (torchrun, or a test that made one at world size 1)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_fine():
    """torch warns that a single process saves or loads alone even when told so (`no_dist`); it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shared_tmp(final: Path, is_main: bool, group=None) -> Path:
    """A fresh hidden temp directory beside `final`, made by rank 0, its name sent to every rank (on `group`, or
    the default one); every rank must see it (one node's disk, or storage all nodes share), or every rank stops
    with the reason."""
    tmp = None
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)
    if distributed():
        import torch.distributed as dist

        box = [tmp]
        dist.broadcast_object_list(box, src=0, group=group)
        tmp = box[0]
        seen = [Path(tmp).is_dir()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, seen[0], group=group)
        if not all(everyone):
            from appliance.train.model import TrainError

            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            blind = [r for r, ok in enumerate(everyone) if not ok]
            raise TrainError(f"ranks {blind} cannot see the checkpoint directory rank 0 made ({final.parent}): "
                             "every node writes its own shard into it",
                             "put artifacts/runs/ on storage every node mounts at the same path (NFS, Lustre)")
    return Path(tmp)


def save(root: Path, step: int, model, optimizer, state: dict, is_main: bool, keep: int) -> Path | None:
    """Every rank writes its shard; rank 0 adds RNG and state.json and renames. Returns the path on rank 0."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    final = root / f"{PREFIX}{step:08d}"
    tmp = _shared_tmp(final, is_main)
    rng = torch.get_rng_state()
    try:
        with _one_process_is_fine():
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_writer(tmp, final),
                     no_dist=not distributed())
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(root, tmp, final, step, rng, state, keep) if is_main else None


class Saving:
    """A checkpoint being written behind the training (`save_async`); `wait()` returns once it is in place: its
    path on rank 0, None on the others. An error of the writing is raised there."""

    def __init__(self, future, step: int):
        self.future, self.step = future, step

    def wait(self) -> Path | None:
        return self.future.result()


def save_async(root: Path, step: int, model, optimizer, state: dict, is_main: bool, keep: int,
               group=None) -> Saving:
    """`save`, with the writing in the background: the trainable state is copied to host memory now (the
    training goes on changing its own), then a thread writes the shards (`torch.distributed.checkpoint.
    async_save`, its collectives on `group`, a gloo group of their own) and rank 0 adds RNG and state.json
    and renames, as `save` does, sealed and atomic alike. The RNG and state are those of now."""
    import concurrent.futures

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    final = root / f"{PREFIX}{step:08d}"
    tmp = _shared_tmp(final, is_main, group)  # on the checkpoint's own group, as async_save's collectives are
    rng, state = torch.get_rng_state(), dict(state)
    if not distributed():  # said from the writing thread, which `_one_process_is_fine` does not cover
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        with _one_process_is_fine():
            upload = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=_writer(tmp, final),
                                    process_group=group, no_dist=not distributed())
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def finish() -> Path | None:
        try:
            upload.result()  # every rank's shard is in once the coordinator's write returns
        except BaseException:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _finish(root, tmp, final, step, rng, state, keep) if is_main else None

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
    future = pool.submit(finish)
    pool.shutdown(wait=False)  # the thread ends with `finish`
    return Saving(future, step)


def _finish(root: Path, tmp: Path, final: Path, step: int, rng, state: dict, keep: int) -> Path:
    """Rank 0, once every shard is in `tmp`: RNG and state.json (last), fsync, rename to `final`, prune."""
    import torch

    try:
        buf = io.BytesIO()
        torch.save({"cpu": rng}, buf)
        _put(tmp, final, "rng.pt", buf.getvalue())
        _put(tmp, final, "state.json", json.dumps({"step": step, **state}, indent=2, default=str).encode())
        if sealed.home_artifacts(final) is not None:  # the manifest last: it lists what this write made
            sealed.need(final).seal_manifest_of(tmp, final)
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        if final.exists():  # the same step written again: the old one set aside whole, never left half-deleted
            sealed.discard(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in all_checkpoints(root)[:-keep]:
        if sealed.home_artifacts(old) is not None:
            sealed.need(old).remove(old)  # and from a manifest that lists its files
        else:
            sealed.discard(old)
    return final


def all_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    inside = sealed.home_artifacts(root) is not None  # there, only a sealed state.json makes a checkpoint
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (
        _sealed(p / "state.json").is_file() if inside else (p / "state.json").exists()))


def latest(root: Path) -> Path | None:
    found = all_checkpoints(root)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    return json.loads(_get(path, "state.json"))


def read_weights(path: Path) -> dict:
    """The trained weights of a checkpoint as full tensors by name, read in this one process (to inspect it)."""
    import torch

    if (path / "model.pt").exists() and sealed.home_artifacts(path) is None:  # an earlier version's, outside
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    with _one_process_is_fine(), _said_plainly():  # in memory: no plaintext copy of the weights on disk
        _load_state_dict(sd, storage_reader=_reader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd["model"]


def load(path: Path, model, optimizer, is_main: bool = True, world: int = 1) -> dict:
    """Load into an already wrapped (DDP/FSDP) model and its optimizer; returns state.json.

    Each rank reads only what its shard of the model and optimizer needs (`torch.distributed.checkpoint`
    reshards to the current processes).
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if (path / "model.pt").exists() and sealed.home_artifacts(path) is None:  # an earlier version's, outside
        _load_full(path, model, optimizer, is_main, world)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())  # the shapes to fill
        both = {"model": model_sd, "optim": optim_sd}
        with _one_process_is_fine(), _said_plainly():
            dcp.load(both, storage_reader=_reader(path), no_dist=not distributed())
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"],
                       options=_options(strict=False))
        del both, model_sd, optim_sd
    torch.set_rng_state(torch.load(io.BytesIO(_get(path, "rng.pt")), weights_only=True)["cpu"])
    return read_state(path)


def _load_full(path: Path, model, optimizer, is_main: bool, world: int) -> None:
    """A checkpoint of full state dicts (earlier versions): rank 0 reads the model and broadcasts it."""
    import torch
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True) if is_main or world == 1 else {}
    set_model_state_dict(model, model_sd, options=_options(True, strict=False, broadcast_from_rank0=world > 1))
    del model_sd
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_options(True, strict=False))
