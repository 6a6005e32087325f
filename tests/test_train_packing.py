"""Packed documents are isolated: positions restart per document and no document attends to another."""

import contextlib

import numpy as np
import pytest

from appliance.train import loop
from appliance.train.config import DataConfig, TrainConfig
from appliance.train.data import IGNORE, conversation, document_positions, encode_chat, pack_chat, position_rule
from appliance.train.model import load_tokenizer
from tests.conftest import open_vault

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def tiny():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _logits(model, tokens, labels, rule):
    import torch

    x, _, pos = loop.to_device(tokens, labels, rule, "cpu")
    with torch.no_grad():
        return model(input_ids=x, position_ids=pos, use_cache=False).logits[0]


def test_positions_restart_after_each_text_document_and_each_conversation():
    row = np.array([[5, 6, EOS, 7, 8, 9, EOS, PAD]])
    assert document_positions(row, row, "text", EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    labels = np.array([[IGNORE, IGNORE, 4, 5, IGNORE, 6, 7, IGNORE]])
    assert document_positions(row, labels, "chat", EOS).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert position_rule(DataConfig(format="text", cross_document=True), EOS) is None
    assert position_rule(DataConfig(format="preference"), EOS) is None  # one conversation per sequence already


def test_document_b_has_the_same_logits_alone_and_packed_after_a(tiny):
    rng = np.random.default_rng(0)
    a = np.append(rng.integers(3, 128, 9), EOS)
    b = np.append(rng.integers(3, 128, 12), EOS)
    alone = _logits(tiny, b[None], b[None], position_rule(DataConfig(format="text"), EOS))
    row = np.concatenate([a, b, [PAD] * 3])[None]
    packed = _logits(tiny, row, row, position_rule(DataConfig(format="text"), EOS))[len(a):len(a) + len(b)]
    assert float((packed - alone).abs().max()) < 1e-5
    # the explicit pre-training option: B sees A, so its logits change
    crossed = _logits(tiny, row, row, position_rule(DataConfig(format="text", cross_document=True), EOS))
    assert float((crossed[len(a):len(a) + len(b)] - alone).abs().max()) > 1e-3


@pytest.fixture(scope="module")
def tok(train_base):
    with open_vault(train_base, read_only=True):  # the tokenizer is sealed: opened with the vault's key
        return load_tokenizer(train_base / "artifacts" / "tokenizers" / "handbook-bpe@1")


def test_sft_rows_keep_conversations_apart_in_the_loss(tiny, tok):
    """The validation loss of a packed SFT row equals that of its conversations scored one by one."""
    pairs = [("What is HALO?", "A permit."), ("Who signs it?", "The site lead, after the review.")]
    packed = pack_chat(tok, pairs, seq_len=96)
    assert packed.rows == 1  # both conversations in one row
    lens = [len(encode_chat(tok, conversation("", p, r))[0]) for p, r in pairs]
    pos = document_positions(packed.tokens, packed.labels, "chat", tok.eos_token_id)[0]
    assert pos[:sum(lens)].tolist() == list(range(lens[0])) + list(range(lens[1]))
    cfg = TrainConfig(micro_batch_size=1)
    rule = position_rule(DataConfig(format="chat"), tok.eos_token_id)

    def mean_loss(tokens, labels):
        return loop.validate(tiny, lambda i: (tokens, labels), 0, 1, cfg, loop.Dist(), contextlib.nullcontext,
                             positions=rule)

    together = mean_loss(packed.tokens, packed.labels)
    scored = [int((np.asarray(encode_chat(tok, conversation("", p, r))[1])[1:] != IGNORE).sum()) for p, r in pairs]
    apart = 0.0
    for (p, r), n in zip(pairs, scored):
        ids, lab = encode_chat(tok, conversation("", p, r))
        apart += mean_loss(np.array([ids]), np.array([lab])) * n
    tiny.eval()
    assert together == pytest.approx(apart / sum(scored), rel=1e-5)
