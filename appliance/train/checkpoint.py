"""Resumable checkpoints: model and optimizer state, step and RNG, written atomically.

Layout under a run directory: `checkpoints/step-00000040/{model.pt, optimizer.pt, state.json}`. A
checkpoint is written to a hidden temp directory, fsynced and renamed, so a kill at any moment leaves
either the previous checkpoints or the new one, never a half-written one. Only the trainable weights are
kept (adapters alone for LoRA); full state dicts are gathered from every rank, so a run may resume with a
different number of processes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from appliance.home import atomic_dir

PREFIX = "step-"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def save(root: Path, step: int, model, optimizer, state: dict, is_main: bool, keep: int) -> Path | None:
    """Every rank takes part (FSDP gathers shards); rank 0 writes. Returns the checkpoint path on rank 0."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    if not is_main:
        return None
    final = root / f"{PREFIX}{step:08d}"
    with atomic_dir(final) as tmp:
        torch.save(model_sd, tmp / "model.pt")
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
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


def load(path: Path, model, optimizer, is_main: bool = True, world: int = 1) -> dict:
    """Load into an already wrapped (DDP/FSDP) model and its optimizer; returns state.json.

    With several processes only rank 0 reads the files; the state is broadcast (and sharded under FSDP),
    so a 7B checkpoint is held in host memory once, not once per rank.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True) if is_main or world == 1 else {}
    set_model_state_dict(model, model_sd, options=_options(strict=False, broadcast_from_rank0=world > 1))
    del model_sd
    optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_options(strict=False))
    del optim_sd
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
    return read_state(path)
