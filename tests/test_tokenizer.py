"""`appliance train tokenizer`: a byte-level BPE on vault data, in the standard transformers layout."""

import json

from tests.conftest import artifact, artifact_bytes, open_vault


def test_tokenizer_learns_the_site_and_loads_offline(home, cli, samples, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb")
    r = cli("--home", home, "--json", "train", "tokenizer", "--dataset", "hb", "--vocab", "1200")
    assert r.code == 0, r.err
    d = r.json
    # the vocabulary stops early when no pair is seen twice more (a small, repetitive corpus)
    assert d["id"] == "hb-bpe@1" and d["dataset"] == "hb@1" and 900 < d["vocab_size"] <= 1200
    from pathlib import Path

    from transformers import AutoTokenizer

    assert sorted(p.name for p in Path(d["path"]).iterdir()) == [  # sealed at rest: no vocabulary in the clear
        ".appliance-manifest.sealed", "appliance.json.sealed", "chat_template.jinja.sealed", "tokenizer.json.sealed",
        "tokenizer_config.json.sealed"]
    with artifact(home, d["path"]) as p:  # stock transformers, from the plaintext in memory
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    text = "The FROSTLINE calibration aligns the cryogenic sensors. Zürich ✓ 42"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: anything round-trips, no unknown token
    # the site's own term is a handful of tokens, far fewer than its characters
    assert len(tok("FROSTLINE calibration")["input_ids"]) <= 6
    assert tok.eos_token == "<|end_of_text|>" and tok.pad_token == "<|pad|>" and tok.bos_token
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # a second tokenizer gets the next number; lineage links it to its data
    r2 = cli("--home", home, "--json", "train", "tokenizer", "--dataset", "hb@1", "--vocab", "600")
    assert r2.json["id"] == "hb-bpe@2"
    tree = cli("--home", home, "--json", "lineage", "hb-bpe@1").json["lineage"]
    assert tree["kind"] == "tokenizer" and tree["parents"][0]["id"] == "hb@1"
    with open_vault(home, read_only=True) as v:
        actions = [a for (a,) in v.con.execute("SELECT action FROM audit").fetchall()]
    assert actions.count("train.tokenizer") == 2
    meta = json.loads(artifact_bytes(home, home / "artifacts" / "tokenizers" / "hb-bpe@1" / "appliance.json"))
    assert meta["dataset"] == "hb@1"


def test_tokenizer_bad_input(home, cli, samples):
    cli("--home", home, "vault", "ingest", samples / "handbook", "--dataset", "hb")
    r = cli("--home", home, "train", "tokenizer", "--dataset", "hb", "--vocab", "100")
    assert r.code == 2 and "too small" in r.err
    r = cli("--home", home, "train", "tokenizer", "--dataset", "nope@1")
    assert r.code == 2 and "no dataset version nope@1" in r.err  # a usage error, as for any reference
    assert not (home / "artifacts" / "tokenizers").exists() or not any((home / "artifacts" / "tokenizers").iterdir())
