"""Preference tuning (`stage = "dpo"`): the loss and its reference, LoRA and full, lineage, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import artifact, copy_home, open_vault
from tests.test_train_run import FAST, losses, run


@pytest.fixture(scope="module")
def pbase(train_base, samples, tmp_path_factory) -> Path:
    """train_base plus `pbase@1` (a tiny model, 8 steps on the handbook) and `handbook-prefs@1`."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run as train
    from appliance.vault.ingest import ingest

    h = copy_home(train_base, tmp_path_factory.mktemp("pref"))
    with open_vault(h) as v:
        train(v, load_recipe("tiny-dense", ["name=pbase", "train.max_steps=8", "train.warmup_steps=1",
                                            "train.checkpoint_every=100"]))
        ingest(v, [samples / "preferences" / "handbook-prefs.jsonl"], "handbook-prefs")
    return h


@pytest.fixture
def phome(pbase, tmp_path) -> Path:
    return copy_home(pbase, tmp_path)


DPO = ["dpo-lora", "--model.base", "pbase@1", "--data.datasets", "handbook-prefs@1", *FAST]


def margins(home: Path, model_dir: str, base_dir: str, split: str = "train") -> list[float]:
    """Per pair: (log p(chosen) - log p(rejected)) under the tuned model minus the same under the base,
    measured here with plain transformers and log_softmax, apart from the training code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.train.config import DataConfig
    from appliance.train.data import encode_chat, preference_triples

    with artifact(home, base_dir) as b, artifact(home, model_dir) as t:  # sealed: opened in memory
        tok = AutoTokenizer.from_pretrained(str(b), local_files_only=True)
        tuned = AutoModelForCausalLM.from_pretrained(str(t), local_files_only=True).eval()
        base = AutoModelForCausalLM.from_pretrained(str(b), local_files_only=True).eval()
    cfg = DataConfig(datasets=["handbook-prefs@1"], format="preference", prompt_field="prompt")
    with open_vault(home, read_only=True) as v:
        triples = list(preference_triples(v.con, ["handbook-prefs@1"], cfg, split))

    def logp(model, prompt: str, answer: str) -> float:
        ids, labels = encode_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != -100)

    return [(logp(tuned, p, c) - logp(tuned, p, r)) - (logp(base, p, c) - logp(base, p, r)) for p, c, r in triples]


def test_dpo_lora_moves_toward_the_chosen_answers(phome, cli, capsys):
    d = run(cli, phome, *DPO, "--train.max_steps", "30", "--train.eval_every", "15", "--train.dpo_beta", "0.5")
    assert d["id"] == "dpo-lora@1" and d["stage"] == "dpo" and d["method"] == "lora"
    assert d["merged"] == "dpo-lora-merged@1" and d["data"]["pairs"] > 40 and d["data"]["dropped"] == 0
    ls = losses(phome, "dpo-lora@1")
    # policy == reference at the first step (adapters start at zero): the loss is exactly log 2
    assert ls[0] == pytest.approx(math.log(2), abs=1e-5)
    assert min(ls[-4:]) < 0.45, ls
    base_dir = str(phome / "artifacts" / "models" / "pbase@1")
    m = margins(phome, str(phome / "artifacts" / "models" / "dpo-lora-merged@1"), base_dir)
    won = sum(x > 0 for x in m) / len(m)
    with capsys.disabled():
        print(f"\nDPO LoRA, 30 steps: loss {ls[0]:.3f} -> {ls[-1]:.3f}; chosen-over-rejected log-prob margin vs "
              f"the base {sum(m) / len(m):+.2f} nats, up on {won:.0%} of {len(m)} training pairs")
    assert won >= 0.9 and sum(m) / len(m) > 1.0
    tree = cli("--home", phome, "--json", "lineage", "dpo-lora@1").json["lineage"]
    assert tree["kind"] == "adapter" and tree["attrs"]["stage"] == "dpo"
    assert {(p["id"], p["role"]) for p in tree["parents"]} == {("pbase@1", "base"), ("handbook-prefs@1", "data")}
    vals = [x["val_loss"] for x in cli("--home", phome, "--json", "train", "metrics", "dpo-lora@1").json["metrics"]
            if x["val_loss"] is not None]
    assert len(vals) == 2 and all(math.isfinite(x) for x in vals)


def test_dpo_full_keeps_a_frozen_reference(phome, cli):
    from appliance import sealed

    d = run(cli, phome, *DPO, "--method", "full", "--name", "dpo-full", "--train.max_steps", "6",
            "--train.lr", "1e-3")
    ls = losses(phome, "dpo-full@1")
    assert ls[0] == pytest.approx(math.log(2), abs=1e-5) and ls[-1] < ls[0]
    files = set(sealed.sealed_names(Path(d["model_path"])))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    m = margins(phome, d["model_path"], str(phome / "artifacts" / "models" / "pbase@1"))
    assert sum(m) / len(m) > 0


def test_dpo_on_two_processes_matches_one(phome, cli):
    args = [*DPO, "--train.max_steps", "2", "--lora.merge", "false"]
    run(cli, phome, *args, "--name", "one")
    two = run(cli, phome, *args, "--name", "two", "--gpus", "2")
    assert two["world"] == 2
    assert losses(phome, "two@1") == pytest.approx(losses(phome, "one@1"), rel=1e-5)


def test_bad_preference_recipes_say_what_to_do(phome, cli):
    r = cli("--home", phome, "train", "run", *DPO, "--data.format", "chat")
    assert r.code == 2 and "data.format 'preference' goes with stage 'dpo'" in r.err
    r = cli("--home", phome, "train", "run", *DPO, "--train.dpo_beta", "0")
    assert r.code == 2 and "train.dpo_beta must be positive" in r.err
    r = cli("--home", phome, "train", "run", *DPO, "--data.cross_document", "true")
    assert r.code == 2 and "data.cross_document is for data.format 'text'" in r.err
    # a table without the columns: one line naming the column and the key that sets it
    r = cli("--home", phome, "train", "run", *DPO, "--data.datasets", "handbook-qa@1")
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2 and len(errors) == 1 and "has no column 'prompt' (data.prompt_field)" in errors[0]
    r = cli("--home", phome, "train", "run", *DPO, "--data.datasets", "handbook@1")
    assert r.code == 2 and "has no table rows to train on" in r.err
    assert [r["id"] for r in cli("--home", phome, "--json", "train", "runs").json["runs"]] == ["pbase@1"]


def test_reference_log_probs_are_computed_once_per_row_not_every_step(tmp_path):
    """A full-method DPO fit over 3 epochs of 8 rows: the reference runs once per block of rows before the first
    step (4 forwards), where scoring it with every micro batch took one per micro batch (12), and the losses
    are those of the reference scored alongside the policy."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.train import loop
    from appliance.train.config import TrainConfig
    from appliance.train.preference import DPO as Objective

    def tiny(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4))

    rng = np.random.default_rng(0)
    tok = rng.integers(0, 128, (8, 32)).astype(np.int32)  # [chosen | rejected], 16 tokens each
    lab = tok.copy()
    lab[:, :6] = lab[:, 16:22] = -100  # the prompt is not scored

    def rows(index):
        return tok[index], lab[index]

    cfg = TrainConfig(max_steps=6, batch_size=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=100,
                      compile="off")
    reference = tiny(1).eval().requires_grad_(False)
    forwards = []
    reference.register_forward_pre_hook(lambda m, a: forwards.append(1))
    cached, reported = Objective(0.1, reference), []
    loop.fit(tiny(0), rows, 8, cfg, loop.Dist(), tmp_path / "a", reported.append, lambda s, p: None,
             objective=cached)
    assert len(forwards) == 4  # 8 rows in blocks of 2, once; not 6 steps x 2 micro batches
    assert cached.table.shape == (8, 2)

    forwards.clear()
    plain = []
    loop.fit(tiny(0), rows, 8, cfg, loop.Dist(), tmp_path / "b", plain.append, lambda s, p: None,
             objective=_NoPrepare(Objective(0.1, reference)))
    assert len(forwards) == 12
    assert [m["loss"] for m in reported] == pytest.approx([m["loss"] for m in plain], rel=1e-6)


class _NoPrepare:
    """An objective as the loop saw DPO before the cache: only `losses`."""

    def __init__(self, inner):
        self.inner = inner

    def losses(self, model, x, y):
        return self.inner.losses(model, x, y)
