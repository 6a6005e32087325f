"""Checkpoints written in the background (`train.checkpoint_async`): the state of the step they were asked at,
whatever the training does meanwhile, and a resume from them repeats the run. The sealed, killed-and-resumed
case runs through the CLI in tests/test_train_run.py."""

import numpy as np
import torch

from appliance.train import checkpoint, loop
from appliance.train.config import TrainConfig

VOCAB = 256


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))


def _rows():
    tok = np.random.default_rng(0).integers(0, VOCAB, (16, 24)).astype(np.int32)
    return lambda index: (tok[index], tok[index])


def test_a_background_checkpoint_holds_the_state_of_when_it_was_asked_for(tmp_path):
    model = _model()
    opt = loop.make_optimizer(model, TrainConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saving = checkpoint.save_async(tmp_path, 3, model, opt, {"loss": 1.0}, True, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the training goes on while it is written
    path = saving.wait()
    assert path == tmp_path / "step-00000003" and checkpoint.read_state(path)["step"] == 3
    saved = checkpoint.read_weights(path)
    assert all(torch.equal(saved[k], before[k]) for k in saved)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left


def test_background_checkpoints_resume_to_the_same_losses(tmp_path):
    def fit(steps, mode, resume=None, ckpt="a"):
        cfg = TrainConfig(max_steps=steps, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                          checkpoint_async=mode, compile="off")
        seen, saved = [], []
        loop.fit(_model(), _rows(), 16, cfg, loop.Dist(), tmp_path / ckpt, lambda m: seen.append(m["loss"]),
                 lambda s, p: saved.append(s), resume_from=resume)
        return seen, saved

    whole, saved = fit(6, "on")
    assert saved == [2, 4, 6]  # each told once it is in place
    assert whole == fit(6, "off", ckpt="b")[0]
    resumed, _ = fit(6, "on", resume=tmp_path / "a" / "step-00000004", ckpt="c")
    assert resumed == whole[4:]
    assert not loop.async_checkpoints(TrainConfig(), "cpu") and loop.async_checkpoints(TrainConfig(), "cuda:0")


def test_a_background_checkpoint_needs_no_cpu_backend_in_the_trainings_group(tmp_path, monkeypatch):
    """On a GPU the training's process group is NCCL alone (FSDP2 makes one even at world size 1), and
    `async_save` refuses a group without a CPU backend: the checkpoint writes on a gloo group of its own. A
    default group whose only backend serves CUDA devices stands in for NCCL here."""
    import torch.distributed as tdist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29617")
    tdist.init_process_group("cuda:gloo", rank=0, world_size=1)
    try:
        cfg = TrainConfig(max_steps=2, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2,
                          checkpoint_async="on", compile="off")
        saved = []
        loop.fit(_model(), _rows(), 16, cfg, loop.Dist(), tmp_path, lambda m: None, lambda s, p: saved.append(s))
        assert saved == [2] and checkpoint.read_state(tmp_path / "step-00000002")["step"] == 2
    finally:
        tdist.destroy_process_group()
