"""The data path: packing with EOS, assistant-only labels, and the token cache inside the vault."""

import numpy as np
import pytest

from appliance.train.config import DataConfig
from appliance.train.data import IGNORE, chat_segments, encode_chat, pack_chat, pack_text, prepare
from appliance.train.model import load_tokenizer
from tests.conftest import open_vault


@pytest.fixture(scope="module")
def tok(train_base):
    with open_vault(train_base, read_only=True):  # the tokenizer is sealed: opened with the vault's key
        return load_tokenizer(train_base / "artifacts" / "tokenizers" / "handbook-bpe@1")


def test_text_packing_puts_eos_between_documents_and_pads_only_the_last_row(tok):
    docs = ["alpha beta gamma", "delta", "epsilon zeta eta theta"]
    p = pack_text(tok, docs, seq_len=8)
    flat = p.tokens.reshape(-1)
    expected = sum((tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs), [])
    assert flat[:len(expected)].tolist() == expected
    assert (flat[len(expected):] == tok.pad_token_id).all()
    assert p.stats["pad_tokens"] == p.tokens.size - len(expected) < 8
    assert (p.labels.reshape(-1)[len(expected):] == IGNORE).all()
    assert (p.labels.reshape(-1)[:len(expected)] == expected).all()
    assert p.stats["documents"] == 3 and p.stats["scored_tokens"] == len(expected)


def test_chat_labels_cover_the_assistant_answer_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is HALO?"},
            {"role": "assistant", "content": "A permit."}]
    segs = chat_segments(tok, msgs)
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(msgs, tokenize=False)
    assert [t for t, scored in segs if scored] == ["A permit.<|im_end|>\n"]
    ids, labels = encode_chat(tok, msgs)
    scored = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(scored) == "A permit.<|im_end|>\n"
    assert "<|im_start|>assistant" in tok.decode(ids)


def test_chat_packing_keeps_pairs_whole_and_fills_rows(tok):
    pairs = [(f"question {i}?", "answer " * (i % 5 + 1)) for i in range(40)]
    p = pack_chat(tok, pairs, seq_len=64)
    assert p.stats["documents"] == 40 and p.stats["truncated"] == 0
    starts = (p.tokens == tok.convert_tokens_to_ids("<|im_start|>")).sum()
    assert starts == 80  # a user and an assistant turn per pair, none cut
    assert p.stats["padding_fraction"] < 0.2
    one = [(f"question {i}?", "answer " * (i % 5 + 1)) for i in range(1)]
    assert pack_chat(tok, one, seq_len=8).stats["truncated"] == 1


def test_rows_are_cached_in_the_vault_and_identical_on_reuse(train_home, tok):
    cfg = DataConfig(datasets=["handbook"], tokenizer="handbook-bpe", seq_len=64)
    with open_vault(train_home) as v:
        a, datasets, cached = prepare(v, cfg, tok, "tokhash")
        assert not cached and datasets[0][0] == "handbook@1"
        b, _, cached2 = prepare(v, cfg, tok, "tokhash")
        assert cached2 and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels)
        assert a.stats["padding_fraction"] < 0.01
        (n,) = v.con.execute("SELECT count(*) FROM token_cache").fetchone()
        assert n >= 1
        chat = DataConfig(datasets=["handbook-qa"], format="chat", seq_len=128)
        c, _, _ = prepare(v, chat, tok, "tokhash")
        d, _, hit = prepare(v, chat, tok, "tokhash")
        assert hit and np.array_equal(c.labels, d.labels) and (c.labels == IGNORE).any()
    # nothing of it outside the encrypted database
    files = [p for p in train_home.rglob("*") if p.is_file() and p.name != "vault.duckdb"]
    needle = a.tokens[0, :16].tobytes()
    assert not any(needle in p.read_bytes() for p in files)


def test_sft_fields_must_exist(train_home, tok):
    from appliance.errors import UsageError

    cfg = DataConfig(datasets=["handbook-qa"], format="chat", prompt_field="question", seq_len=64)
    with open_vault(train_home) as v, pytest.raises(UsageError, match="no column 'question'.*instruction"):
        prepare(v, cfg, tok, "x")
