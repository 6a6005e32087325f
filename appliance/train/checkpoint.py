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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from appliance.home import fsync_path

PREFIX = "step-"


def _options(full: bool = False, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, **kw)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_fine():
    """torch warns that a single process saves or loads alone even when told so (`no_dist`); it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shared_tmp(final: Path, is_main: bool) -> Path:
    """A fresh hidden temp directory beside `final`, made by rank 0, its name sent to every rank."""
    tmp = None
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)
    if _distributed():
        import torch.distributed as dist

        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        tmp = box[0]
    path = Path(tmp)
    path.mkdir(parents=True, exist_ok=True)  # a node that does not share rank 0's disk
    return path


def save(root: Path, step: int, model, optimizer, state: dict, is_main: bool, keep: int) -> Path | None:
    """Every rank writes its shard; rank 0 adds RNG and state.json and renames. Returns the path on rank 0."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    final = root / f"{PREFIX}{step:08d}"
    tmp = _shared_tmp(final, is_main)
    try:
        with _one_process_is_fine():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not _distributed())
        if not is_main:
            return None
        torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in all_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists())


def latest(root: Path) -> Path | None:
    found = all_checkpoints(root)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def read_weights(path: Path) -> dict:
    """The trained weights of a checkpoint as full tensors by name, read in this one process (to inspect it)."""
    import torch

    if (path / "model.pt").exists():
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        with _one_process_is_fine():
            dcp_to_torch_save(str(path), str(Path(tmp) / "all.pt"))
        return torch.load(Path(tmp) / "all.pt", map_location="cpu", weights_only=True)["model"]


def load(path: Path, model, optimizer, is_main: bool = True, world: int = 1) -> dict:
    """Load into an already wrapped (DDP/FSDP) model and its optimizer; returns state.json.

    Each rank reads only what its shard of the model and optimizer needs (`torch.distributed.checkpoint`
    reshards to the current processes).
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if (path / "model.pt").exists():
        _load_full(path, model, optimizer, is_main, world)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())  # the shapes to fill
        both = {"model": model_sd, "optim": optim_sd}
        with _one_process_is_fine():
            dcp.load(both, checkpoint_id=str(path), no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"],
                       options=_options(strict=False))
        del both, model_sd, optim_sd
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
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
