"""The loop on two gloo processes, in-process (no launcher): what FSDP2 sends, and what a checkpoint holds."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from appliance.train import loop
from appliance.train.config import TrainConfig

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny(layers: int = 1):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _rows(n: int = 16, t: int = 8):
    tokens = np.random.default_rng(0).integers(0, 64, (n, t)).astype(np.int32)
    return lambda index: (tokens[index], tokens[index])


def _join(rank: int, world: int, port: int) -> loop.Dist:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    return loop.Dist.from_env()


def _accumulate(rank: int, world: int, port: int, out: str) -> None:
    """3 optimizer steps of 4 micro batches per process under FSDP2; counts the reduce-scatters."""
    import torch.distributed as tdist

    dist = _join(rank, world, port)
    model = _tiny()
    loop.shard(model)
    units = sum(1 for m in model.modules() if hasattr(m, "set_requires_gradient_sync"))
    calls = []
    real = tdist.reduce_scatter_single

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    tdist.reduce_scatter_single = counted
    cfg = TrainConfig(max_steps=3, batch_size=8, micro_batch_size=1, warmup_steps=0, parallel="fsdp")
    run = loop._Training(model, _rows(), 16, cfg, dist, None, lambda m: None, lambda *a: None, None, 0.0, {}, 0, None)
    for _ in range(cfg.max_steps):
        run.train_step()
    tdist.reduce_scatter_single = real
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"calls": len(calls), "units": units}, f)
    tdist.destroy_process_group()


def test_fsdp_gradient_accumulation_reduce_scatters_once_per_optimizer_step(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "count.json"
    mp.spawn(_accumulate, args=(2, _free_port(), str(out)), nprocs=2)
    got = json.loads(out.read_text())
    assert got["units"] == 2  # the decoder layer and the root
    assert got["calls"] / got["units"] == 3  # 3 steps x 4 micro batches: 12 before the fix


def _sharded_checkpoint(rank: int, world: int, port: int, root: str) -> None:
    """2 FSDP2 steps, a checkpoint, then a fresh model and optimizer loaded from it, counting the bytes read."""
    import torch
    import torch.distributed as tdist
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from appliance.train import checkpoint

    dist = _join(rank, world, port)
    cfg = TrainConfig(max_steps=2, batch_size=4, micro_batch_size=2, warmup_steps=0, parallel="fsdp")

    def training():
        model = _tiny(2)
        loop.shard(model)
        return loop._Training(model, _rows(), 16, cfg, dist, Path(root) / "checkpoints", lambda m: None,
                              lambda *a: None, None, 0.0, {}, 0, None)

    run = training()
    for _ in range(cfg.max_steps):
        run.train_step()
    run.checkpoint()
    full = get_state_dict(run.model, run.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, Path(root) / "full.pt")
    fresh = training()
    read = []
    real = FileSystemReader.read_data

    def counted(self, plan, planner):
        read.append(sum(self.storage_data[item.storage_index].length for item in plan.items))
        return real(self, plan, planner)

    FileSystemReader.read_data = counted
    checkpoint.load(checkpoint.latest(Path(root) / "checkpoints"), fresh.model, fresh.opt, dist.is_main, world)
    FileSystemReader.read_data = real
    pairs = zip(run.model.parameters(), fresh.model.parameters())
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs)
    with open(Path(root) / f"rank{rank}.json", "w") as f:
        json.dump({"read": sum(read), "same": same}, f)
    tdist.destroy_process_group()


def test_checkpoints_are_sharded_each_rank_reads_its_shard_and_one_process_resumes_them(tmp_path):
    import torch
    import torch.multiprocessing as mp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from appliance.train import checkpoint

    mp.spawn(_sharded_checkpoint, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ck = checkpoint.latest(tmp_path / "checkpoints")
    assert ck.name == "step-00000002" and checkpoint.read_state(ck)["step"] == 2
    shards = sorted(ck.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert not list(tmp_path.joinpath("checkpoints").glob(".*"))  # no temp directory left
    total = sum(p.stat().st_size for p in shards)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["same"]  # resumed weights equal the saved ones, shard by shard
        assert 0 < got["read"] < 0.6 * total  # about half: its own shard, never the whole checkpoint
    # resharded on load: one process (no FSDP) resumes the 2-process checkpoint exactly
    model = _tiny(2)
    opt = loop.make_optimizer(model, TrainConfig())
    checkpoint.load(ck, model, opt)
    full_model, full_optim = torch.load(tmp_path / "full.pt", weights_only=True)
    mine_model, mine_optim = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    for name, w in full_model.items():
        assert torch.equal(mine_model[name], w), name
    for name, moments in full_optim["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(mine_optim["state"][name][k].float(), moments[k].float()), (name, k)

def _ddp_resume(rank: int, world: int, port: int, root: str) -> None:
    """DDP: 4 steps straight, and 2 steps + sharded checkpoint + a fresh model resumed from it + 2 steps."""
    import torch.distributed as tdist

    from appliance.train import checkpoint

    dist = _join(rank, world, port)
    cfg = TrainConfig(max_steps=4, batch_size=4, micro_batch_size=1, warmup_steps=1, parallel="ddp")

    def training(name: str, resume=None):
        return loop._Training(_tiny(2), _rows(), 16, cfg, dist, Path(root) / name, lambda m: None, lambda *a: None,
                              resume, 0.0, {}, 0, None)

    run = training("a")
    straight = [run.train_step().loss for _ in range(4)]
    first = training("b")
    halves = [first.train_step().loss for _ in range(2)]
    first.checkpoint()
    tdist.barrier()
    second = training("b", checkpoint.latest(Path(root) / "b"))
    halves += [second.train_step().loss for _ in range(2)]
    if rank == 0:
        (Path(root) / "losses.json").write_text(json.dumps({"straight": straight, "resumed": halves}))
    tdist.destroy_process_group()


def test_ddp_resume_from_a_sharded_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_resume, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    got = json.loads((tmp_path / "losses.json").read_text())
    assert got["resumed"] == got["straight"]


# --- end to end through `appliance train run` ----------------------------------------------------------------
from tests import test_preference as preference  # noqa: E402
from tests.test_train_run import losses, run  # noqa: E402

pbase, phome, DPO = preference.pbase, preference.phome, preference.DPO  # the preference tests' fixtures


def test_full_dpo_sharded_on_two_processes_matches_one(phome, cli):
    args = [*DPO, "--method", "full", "--train.max_steps", "2"]
    run(cli, phome, *args, "--name", "one")
    two = run(cli, phome, *args, "--name", "two", "--gpus", "2", "--train.parallel", "fsdp")
    assert two["world"] == 2
    assert losses(phome, "two@1") == pytest.approx(losses(phome, "one@1"), rel=1e-5)


def test_full_grpo_sharded_on_two_processes_finishes(ghome, cli):
    from tests.test_grpo import GRPO

    d = run(cli, ghome, *GRPO, "--method", "full", "--name", "gfsdp", "--train.max_steps", "2", "--gpus", "2",
            "--train.parallel", "fsdp")
    assert d["world"] == 2 and d["status"] == "done" and len(losses(ghome, "gfsdp@1")) == 2
