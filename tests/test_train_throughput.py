"""Throughput work of the loop, checked by what it computes and materializes (never by timing): the chunked
cross-entropy, selective activation checkpointing, per-layer compile, reading scalars every N steps, and
fetching the next batch on a thread."""

import threading

import numpy as np
import pytest
import torch

from appliance.train import loop
from appliance.train.config import TrainConfig, checkpointing_mode
from appliance.train.data import IGNORE
from appliance.train.loss import chunked_cross_entropy, head_loss

VOCAB, SEQ = 512, 32


def _model(layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _rows(n=16, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, VOCAB, (n, SEQ)).astype(np.int32)
    lab = tok.copy()
    lab[:, :4] = IGNORE  # some positions unscored

    def rows(index):
        return tok[index], lab[index]

    return rows


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op produces whose last dimension is the vocabulary (logits, their grads)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, tuple | list) else [out]:
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given  # not a view
            if new and t.ndim and t.shape[-1] == VOCAB:
                self.largest = max(self.largest, t.numel())
        return out


def _loss_and_grads(model, x, target, chunked: bool, chunk: int = 16):
    model.zero_grad()
    with _Shapes() as shapes:
        if chunked:
            with head_loss(model, target, chunk):
                loss = model(input_ids=x, use_cache=False).logits
        else:
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), target.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, shapes.largest


def test_chunked_cross_entropy_gives_the_plain_loss_and_grads_without_whole_logits():
    model = _model(2)
    x = torch.randint(0, VOCAB, (4, SEQ))
    target = torch.nn.functional.pad(x[:, 1:], (0, 1), value=IGNORE)
    target[0, :5] = IGNORE
    plain, plain_grads, plain_largest = _loss_and_grads(model, x, target, chunked=False)
    chunked, chunked_grads, chunked_largest = _loss_and_grads(model, x, target, chunked=True)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    for name, g in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    tokens = 4 * SEQ
    assert plain_largest == tokens * VOCAB  # the whole (tokens, vocab) logits
    assert chunked_largest == 16 * VOCAB  # one chunk of 16 tokens at a time, forward and backward
    assert model.lm_head.forward.__func__ is torch.nn.Linear.forward  # the head is itself again


def test_chunked_cross_entropy_of_an_uneven_last_chunk_and_no_grad():
    h, w = torch.randn(37, 8, dtype=torch.float64), torch.randn(VOCAB, 8, dtype=torch.float64)
    t = torch.randint(0, VOCAB, (37,))
    t[3] = IGNORE
    plain = torch.nn.functional.cross_entropy(h @ w.T, t, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        assert chunked_cross_entropy(h, w, t, chunk=10).item() == pytest.approx(plain.item(), rel=1e-12)


def _count_layer_forwards(model):
    calls = []  # a checkpointed layer's recompute calls its MLP (and its hooks) again, not the layer's own hooks
    for layer in loop.decoder_layers(model):
        layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


@pytest.mark.parametrize(("mode", "recomputed"), [("none", 0), ("selective", 2), ("full", 4), (True, 4)])
def test_activation_checkpointing_recomputes_every_layer_every_other_or_none(mode, recomputed):
    model = _model(4)
    assert loop.checkpoint_layers(model, checkpointing_mode(mode)) == recomputed
    calls = _count_layer_forwards(model)
    model.train()
    x = torch.randint(0, VOCAB, (2, SEQ))
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    assert len(calls) == 4 + recomputed  # each checkpointed layer runs again in the backward
    grads = {n: p.grad for n, p in model.named_parameters()}
    ref = _model(4)
    ref(input_ids=x, labels=x, use_cache=False).loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)  # recomputing changes memory, not the math


def test_bad_checkpointing_and_compile_settings_are_refused():
    t = TrainConfig(activation_checkpointing="some", compile="yes", sync_every=-1)
    problems = " ".join(t.problems())
    assert "train.activation_checkpointing must be full, selective or none" in problems
    assert "train.compile must be auto, on or off" in problems and "train.sync_every" in problems


def test_compile_is_on_by_default_only_on_a_gpu_and_compiles_each_layer():
    assert loop.compile_wanted("auto", "cuda:0") and not loop.compile_wanted("auto", "cpu")
    assert loop.compile_wanted("on", "cpu") and not loop.compile_wanted("off", "cuda")
    model = _model(2)
    x = torch.randint(0, VOCAB, (1, 8))
    want = model(input_ids=x, use_cache=False).logits
    assert loop.compile_layers(model, backend="eager") == 2  # eager: traced by dynamo, nothing generated
    assert all(layer._compiled_call_impl is not None for layer in loop.decoder_layers(model))
    torch.testing.assert_close(model(input_ids=x, use_cache=False).logits, want)


def _fit(tmp_path, sync_every, monkeypatch, steps=4):
    reads = []
    host = loop._to_host
    monkeypatch.setattr(loop, "_to_host", lambda t: reads.append(1) or host(t))
    cfg = TrainConfig(max_steps=steps, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=1000,
                      sync_every=sync_every, compile="off")
    reported = []
    res = loop.fit(_model(2), _rows(), 16, cfg, loop.Dist(), tmp_path / f"ckpt-{sync_every}",
                   lambda m: reported.append(m), lambda s, p: None)
    return res, reported, len(reads)


def test_scalars_are_read_every_n_steps_and_every_step_is_still_reported(tmp_path, monkeypatch):
    every, each_every, reads_every = _fit(tmp_path, 1, monkeypatch)
    fourth, each_fourth, reads_fourth = _fit(tmp_path, 4, monkeypatch)
    assert [m["step"] for m in each_fourth] == [1, 2, 3, 4]
    assert [m["loss"] for m in each_fourth] == [m["loss"] for m in each_every]  # the same numbers, read later
    assert [m["grad_norm"] for m in each_fourth] == [m["grad_norm"] for m in each_every]
    assert (reads_every, reads_fourth) == (4, 1)  # waits for the device: one a step, or one every 4 steps
    assert fourth.loss == every.loss
    assert loop.sync_interval(TrainConfig(), "cuda:0") == 10 and loop.sync_interval(TrainConfig(), "cpu") == 1


def test_the_next_batch_is_fetched_on_a_thread_while_the_step_runs(tmp_path):
    events = []
    inner = _rows()

    def rows(index):
        events.append(("rows", threading.current_thread() is threading.main_thread()))
        return inner(index)

    cfg = TrainConfig(max_steps=3, batch_size=4, micro_batch_size=4, warmup_steps=1, checkpoint_every=1000,
                      sync_every=1, compile="off")
    loop.fit(_model(2), rows, 16, cfg, loop.Dist(), tmp_path / "ckpt",
             lambda m: events.append(("step", m["step"])), lambda s, p: None)
    # step 2's rows are fetched (off the main thread) before step 1 is reported
    assert events.index(("rows", False)) < events.index(("step", 1))
    assert events.count(("rows", False)) == 2
    assert [e for e in events if e[0] == "step"] == [("step", 1), ("step", 2), ("step", 3)]
