"""Issue 23, the operator's day: repeated options, shortened runs, round numbers, a fast recipe list."""

from __future__ import annotations

import subprocess

import click
import pytest

from tests.conftest import PY, open_vault, python_env


# --- a repeated option never silently drops values --------------------------------------------------
def test_tokenizer_trains_on_every_dataset_given(train_home, cli):
    n = {d: cli("--home", train_home, "--json", "vault", "show", d).json["splits"]["train"]
         for d in ("handbook@1", "mail@1")}
    r = cli("--home", train_home, "--json", "train", "tokenizer", "--dataset", "handbook@1", "-d", "mail@1",
            "--vocab", "300", "--name", "both")
    assert r.code == 0, r.err
    res = r.json
    assert res["datasets"] == ["handbook@1", "mail@1"] and res["dataset"] == "handbook@1,mail@1"
    assert res["records"] == n["handbook@1"] + n["mail@1"]
    lin = cli("--home", train_home, "--json", "lineage", res["id"]).out
    assert "handbook@1" in lin and "mail@1" in lin
    human = cli("--home", train_home, "train", "tokenizer", "-d", "handbook@1", "-d", "mail@1", "--vocab", "300")
    assert human.code == 0 and "handbook@1, mail@1" in human.out


def test_a_repeated_single_value_option_is_refused_in_one_line(tmp_path, cli):
    for args, flag in ((["train", "tokenizer", "-d", "a@1", "--vocab", "300", "--vocab=400"], "--vocab"),
                       (["eval", "gate", "--baseline", "a@1", "--baseline", "b@1", "--candidate", "c@1"],
                        "--baseline"),
                       (["vault", "show", "x@1", "--home", tmp_path, "--home", tmp_path / "y"], "--home"),
                       (["--home", tmp_path, "--home", tmp_path / "y", "vault", "datasets"], "--home"),
                       (["grant", "--agent", "a", "--caps", "read", "--caps", "train"], "--caps")):
        r = cli(*args)
        assert r.code == 2, (args, r.err)
        assert flag in r.err and "more than once" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert "comma-separated" in r.err  # --caps takes several values, in one list


def test_every_command_refuses_a_repeat_of_each_single_value_option():
    """The check sits in the shared command class, so no command or option can miss it."""
    from appliance.cli import cli as root
    from appliance.cli.app import OnceCommand, OnceGroup, refuse_repeats

    def walk(group):
        for sub in group.commands.values():
            if isinstance(sub, click.Group):
                assert isinstance(sub, OnceGroup), sub.name
                yield from walk(sub)
            else:
                yield sub

    checked = 0
    for cmd in walk(root):
        assert isinstance(cmd, OnceCommand), cmd.name
        ctx = click.Context(cmd, info_name=cmd.name)
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag or p.count:
                continue
            twice = [p.opts[0], "1", p.opts[0], "2"]
            if p.multiple:
                refuse_repeats(cmd, ctx, twice)  # takes several: fine
            else:
                with pytest.raises(click.UsageError, match="more than once"):
                    refuse_repeats(cmd, ctx, twice)
                checked += 1
    assert checked > 50
    with pytest.raises(click.UsageError):
        refuse_repeats(root, click.Context(root), ["--json", "--home", "a", "--home", "b", "vault"])
    refuse_repeats(root, click.Context(root), ["--home", "a", "vault", "show", "--home", "b"])  # the sub's own


def test_a_repeated_recipe_key_is_refused(cli):
    r = cli("train", "run", "tiny-dense", "--train.lr", "1e-3", "--set", "train.lr=2e-3")
    assert r.code == 2 and "train.lr is given more than once" in r.err


def test_several_datasets_and_a_shortened_run(train_home, cli):
    """`--data.datasets` repeated trains on both; `--train.max_steps 2` under a warmup of 4 is fitted, not refused."""
    r = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--data.datasets", "handbook@1",
            "--data.datasets", "mail@1", "--train.max_steps", "2", "--train.checkpoint_every", "100")
    assert r.code == 0, r.err
    res = r.json
    assert res["steps"] == 2
    assert res["notes"] == ["train.warmup_steps 4 -> 0: scaled to the shortened run of 2 steps (give "
                            "--train.warmup_steps to choose)"]
    assert "note: train.warmup_steps 4 -> 0" in r.err
    lin = cli("--home", train_home, "--json", "lineage", res["id"]).out
    assert "handbook@1" in lin and "mail@1" in lin


def test_warmup_is_scaled_only_when_the_user_shortens_the_run():
    from appliance.errors import UsageError
    from appliance.train.config import load_recipe

    r = load_recipe("dense-1b", ["train.max_steps=1000"])  # 2000 of 20000 steps: the same tenth
    assert r.train.warmup_steps == 100 and len(r.notes) == 1
    assert load_recipe("dense-1b", ["train.max_steps=5000"]).train.warmup_steps == 2000  # still fits: kept
    assert load_recipe("sft-lora", ["model.base=b@1", "data.datasets=q@1", "train.max_steps=2"]).train.warmup_steps == 0
    with pytest.raises(UsageError, match="warmup_steps"):  # asked for explicitly: still refused
        load_recipe("dense-1b", ["train.max_steps=10", "train.warmup_steps=20"])


# --- round numbers for people -----------------------------------------------------------------------
def test_number_formatting():
    from appliance.api.format import change, num

    assert num(449.2128396283631) == "449.2" and num(1442.2647574461048) == "1442"
    assert num(0.012345678) == "0.01235" and num(None) == "-" and num(3) == "3" and num(2.0) == "2"
    assert change(449.2128396283631, 1442.2647574461048) == "449.2 -> 1442 (+221 %)"
    assert change(0.5, 0.45) == "0.5 -> 0.45 (-10 %)"


GATE = {"a": "eval-x@1", "b": "eval-x@2", "changed": [], "wins": [], "losses": ["perplexity"],
        "metrics": {"perplexity": {"a": 449.2128396283631, "b": 1442.2647574461048, "delta": 993.0519178177417,
                                   "higher_is_better": False, "ci95": [12.345678, 2001.98765]}},
        "regressions": [{"metric": "perplexity", "baseline": 449.2128396283631, "candidate": 1442.2647574461048,
                         "tolerance": 0.02}], "ok": False}


def test_eval_gate_and_compare_print_round_numbers_and_json_stays_exact(home, cli, monkeypatch):
    from appliance import api

    monkeypatch.setattr(api, "eval_gate", lambda *a, **k: dict(GATE))
    monkeypatch.setattr(api, "eval_compare", lambda *a, **k: {k: v for k, v in GATE.items()
                                                              if k not in ("regressions", "ok")})
    r = cli("--home", home, "eval", "gate", "--baseline", "eval-x@1", "--candidate", "eval-x@2")
    assert r.code == 1
    assert "regression: perplexity 449.2 -> 1442 (+221 %)" in r.err
    assert "449.2128" not in r.out + r.err and "1442.26" not in r.out + r.err
    assert "+993.1 (+221 %)" in r.out and "[+12.35, +2002]" in r.out
    r = cli("--home", home, "--json", "eval", "gate", "--baseline", "eval-x@1", "--candidate", "eval-x@2")
    assert r.json["regressions"][0]["candidate"] == 1442.2647574461048  # exact
    r = cli("--home", home, "eval", "compare", "eval-x@1", "eval-x@2")
    assert r.code == 0 and "449.2" in r.out and "449.2128" not in r.out


def test_drift_and_train_metrics_print_round_numbers(home, cli, monkeypatch):
    from appliance import api

    monkeypatch.setattr(api, "eval_drift", lambda *a, **k: {
        "ok": True, "recorded": False, "model": "m@1", "baseline": "m@1", "baseline_model": "m@1", "dataset": "d@1",
        "probes": 20, "answer_change_rate": 0.05, "mean_kl": 0.001234567, "max_kl": 0.0456789, "changed_probes": []})
    r = cli("--home", home, "eval", "drift", "--model", "m@1")
    assert r.code == 0 and "mean KL 0.001235" in r.out and "worst probe KL 0.04568" in r.out, r.out
    monkeypatch.setattr(api, "train_metrics", lambda *a, **k: {"run": "t@1", "metrics": [
        {"step": 1, "loss": 7.123456789, "lr": 0.000123456, "grad_norm": 1.98765, "tokens_per_s": 1234.5,
         "elapsed": 0.1, "tokens": 10}]})
    r = cli("--home", home, "train", "metrics", "t@1")
    assert r.code == 0 and "7.123" in r.out and "0.000123" in r.out and "1.988" in r.out, r.out
    assert "7.1235" not in r.out


# --- `train recipes`: fast, and counted with the real vocabulary --------------------------------------
def test_train_recipes_does_not_import_torch(tmp_path):
    code = ("import sys\nfrom appliance.cli import main\ntry:\n    main(['--home', sys.argv[1], 'train', 'recipes'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([PY, "-c", code, str(tmp_path / "h")], env=python_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tiny-dense" in r.stdout and r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_train_recipes_counts_with_the_homes_tokenizer(train_home, tmp_path, cli):
    from appliance.train.config import load_recipe
    from appliance.train.model import count_parameters, load_tokenizer

    with open_vault(train_home, read_only=True):  # the tokenizer is sealed: opened with the vault's key
        vocab = len(load_tokenizer(train_home / "artifacts" / "tokenizers" / "handbook-bpe@1"))
    items = {i["name"]: i for i in cli("--home", train_home, "--json", "train", "recipes").json["recipes"]}
    p = items["tiny-dense"]["parameters"]
    assert p["vocab_from"] == "handbook-bpe@1" and p["vocab_size"] == vocab
    assert p["total"] == count_parameters(load_recipe("tiny-dense").model, vocab)["total"]
    assert items["dense-1b"]["parameters"]["vocab_from"] is None  # corpus-bpe is not in this home
    assert items["dense-1b"]["parameters"]["vocab_size"] == 32000
    human = cli("--home", train_home, "train", "recipes").out
    assert "handbook-bpe@1" in human and "(assumed)" in human
    empty = {i["name"]: i for i in cli("--home", tmp_path / "none", "--json", "train", "recipes").json["recipes"]}
    assert empty["tiny-dense"]["parameters"]["vocab_from"] is None


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "moe-8x1b"])
def test_parameter_count_matches_the_model_built(name):
    """count_parameters is arithmetic (no torch); it must equal the model transformers builds."""
    import torch
    from transformers import AutoModelForCausalLM

    from appliance.train.config import load_recipe
    from appliance.train.model import count_parameters, hf_config

    class Vocab:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self):
            return 2005

    m = load_recipe(name).model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(m, Vocab()))
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert count_parameters(m, 2005) == {"total": total,
                                         "active": total - expert + expert * m.experts_per_token // m.num_experts}
