"""Issue 23, the operator's day (part B): blank answers, over-fitting said, quiet LoRA runs, quantize on too
little text, and table rows pre-trained on as text. Tiny runs only; nothing asserts that training helps."""

from __future__ import annotations

import re

import pytest

from tests.conftest import copy_home, open_vault

FAST = ["--train.max_steps", "2", "--train.warmup_steps", "1", "--train.checkpoint_every", "100"]


# --- 11: table rows in pre-training ------------------------------------------------------------------------
def _packed_text(h, tables: str) -> tuple[str, dict]:
    from appliance.train import data
    from appliance.train.config import DataConfig
    from appliance.train.model import load_tokenizer

    with open_vault(h) as v:
        path = v.home.artifacts / "tokenizers" / "handbook-bpe@1"
        tok = load_tokenizer(path)
        cfg = DataConfig(datasets=["handbook-qa@1"], tokenizer="handbook-bpe@1", seq_len=64, tables=tables)
        packed = data._pack(v.con, cfg, tok, ["handbook-qa@1"], "train")
    return tok.decode(packed.tokens.reshape(-1).tolist()), packed.stats


def test_table_rows_pretrain_as_text_without_their_row_header(train_home):
    text, stats = _packed_text(train_home, "text")
    assert "instruction:" in text and "response:" in text
    assert not re.search(r"row \d+\]", text), text[:300]
    assert stats["tables"] == "text" and stats["table_rows"] > 0


def test_row_prose_keeps_text_that_is_not_a_row_header():
    from appliance.train.data import row_prose

    assert row_prose("[procedures-qa row 5]\ninstruction: a\nresponse: b") == "instruction: a\nresponse: b"
    assert row_prose("[see the manual]\nbody") == "[see the manual]\nbody"


def test_pretraining_on_a_qa_version_says_how_it_took_the_rows(train_home, cli):
    r = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--data.datasets", "handbook-qa@1",
            "--data.tables", "text", *FAST)
    assert r.code == 0, r.err
    assert r.json["data"]["tables"] == "text" and r.json["data"]["table_rows"] > 0
    r = cli("--home", train_home, "train", "run", "tiny-dense", "--set", "name=skipper", "--data.datasets",
            "handbook-qa@1,handbook@1", "--data.tables", "skip", *FAST)
    assert r.code == 0, r.err
    assert "table rows left out (data.tables)" in r.err


# --- 1b: over-fitting said -------------------------------------------------------------------------------
def test_watch_warns_once_when_validation_loss_turns_up():
    from appliance.train.watch import LossWatch

    w = LossWatch(rises=3, collapse=0.0)
    said = [w.feed(s, 2.0, v) for s, v in enumerate([3.0, 2.5, 2.4, 2.6, 2.7, 2.8, 2.9, 3.0], 1)]
    assert said[:5] == [None] * 5
    assert said[5] is not None and "validation loss rose for 3 evaluations" in said[5]
    assert "2.4000 at step 3 -> 2.8000 at step 6" in said[5] and "early_stop_patience" in said[5]
    assert said[6:] == [None, None] and w.warnings == [said[5]]


def test_watch_warns_when_training_loss_collapses_far_below_validation():
    from appliance.train.watch import LossWatch

    w = LossWatch(collapse=0.05, window=5)
    losses = [3.0, 1.0, 0.2, 0.04, 0.02, 0.015, 0.014, 0.014, 0.013]
    said = [w.feed(s, loss, 2.5 if s == 2 else None) for s, loss in enumerate(losses, 1)]
    hits = [(i + 1, t) for i, t in enumerate(said) if t]
    assert len(hits) == 1 and hits[0][0] == 8  # the mean of the last 5 steps is below 0.05 from step 8
    assert "while validation loss is 2.5000" in hits[0][1]
    w = LossWatch(collapse=0.05, window=2)  # validation close to training loss: learning, not over-fitting
    assert [w.feed(s, 0.01, 0.02) for s in (1, 2, 3)] == [None, None, None]
    w = LossWatch(collapse=0.05, window=2)  # no validation measured: the collapse alone is said
    assert [bool(w.feed(s, 0.01)) for s in (1, 2, 3)] == [False, True, False]
    assert "memorising" in w.warnings[0]


def test_a_collapsing_run_warns_on_stderr_and_in_its_result(train_home, cli):
    # A huge learning rate on a tiny model is not what we test; a threshold above any loss is: the run must
    # say the warning once on stderr and keep it in its result and lineage.
    from appliance.train import run as run_mod

    orig = run_mod.LossWatch
    run_mod.LossWatch = lambda collapse=0.05: orig(collapse=1e9, window=2)
    try:
        r = cli("--home", train_home, "--json", "train", "run", "tiny-dense", *FAST)
    finally:
        run_mod.LossWatch = orig
    assert r.code == 0, r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("warning: training loss")]
    assert len(lines) == 1, r.err
    assert r.json["warnings"] == lines
    r = cli("--home", train_home, "--json", "lineage", r.json["id"])
    assert r.code == 0, r.err
    assert lines[0] in r.out


def test_a_job_runs_warnings_land_in_its_log(train_home, monkeypatch):
    # The runner is what `jobs logs -f` follows: an over-fitting warning must be there, not only in the result.
    from appliance.jobs import queue, runner
    from appliance.jobs.log import JobLog
    from appliance.train import run as run_mod

    orig = run_mod.LossWatch
    monkeypatch.setattr(run_mod, "LossWatch", lambda collapse=0.05: orig(collapse=1e9, window=2))
    with open_vault(train_home) as v:
        job = queue.submit(v, "train", {"recipe": "tiny-dense", "overrides": [
            "train.max_steps=2", "train.warmup_steps=1", "train.checkpoint_every=100"]})
        log = JobLog(v.home.logs, job.id, v.secrets.data_key)
        res = runner.run_train(v, queue.get(v.con, job.id), log)
        lines = log.lines()
    warned = [ln for ln in lines if "warning at step" in ln and "training loss" in ln]
    assert len(warned) == 1, lines
    assert res["warnings"] and res["warnings"][0] in warned[0]


# --- 4: no hub-kernel advice on a LoRA run ---------------------------------------------------------------
# Run the CLI in a fresh interpreter where bitsandbytes believes the CPU has AVX512-BF16 (as the hospital's
# box did): its CPU backend then looks for a `kernels-community` hub kernel when it is imported.
AVX512_CLI = r"""
import importlib.abc, importlib.machinery, sys

class Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Patch())
from appliance.cli import main
main(sys.argv[1:])
"""


def test_a_lora_run_prints_no_hub_kernel_advice(train_home, cli):
    import subprocess

    from tests.conftest import PY, python_env

    r = cli("--home", train_home, "train", "run", "tiny-dense", "--set", "name=kbase", *FAST)
    assert r.code == 0, r.err
    p = subprocess.run([PY, "-c", AVX512_CLI, "--home", str(train_home), "train", "run", "sft-lora",
                        "--model.base", "kbase@1", "--set", "name=klora", *FAST],
                       capture_output=True, text=True, env=python_env(), timeout=600)
    assert p.returncode == 0, p.stderr
    said = [ln for ln in p.stderr.splitlines() if "kernels" in ln or "pip install" in ln]
    assert said == [], said


# --- 8: quantize says what it measured on, and warns when that is too little -----------------------------
@pytest.fixture(scope="module")
def obase(train_base, tmp_path_factory):
    """train_base plus `ob@1`: tiny-dense, 2 steps on handbook@1 (what it says does not matter here)."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run

    h = copy_home(train_base, tmp_path_factory.mktemp("opb"))
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", ["name=ob", "train.max_steps=2", "train.warmup_steps=1",
                                          "train.checkpoint_every=100"]))
    return h


@pytest.fixture
def ohome(obase, tmp_path):
    return copy_home(obase, tmp_path)


def test_quantize_warns_on_too_little_text_and_strict_fails(ohome, cli):
    r = cli("--home", ohome, "quantize", "ob@1", "--type", "f32", "--eval", "handbook-qa@1", "--threads", "1")
    assert r.code == 0, r.err
    assert "quality data: handbook-qa@1, given with --eval; its validation split" in r.out
    warned = [ln for ln in r.err.splitlines() if ln.startswith("warning: quality measured on only")]
    assert len(warned) == 1 and "fewer than 512" in warned[0], r.err
    r = cli("--home", ohome, "--json", "quantize", "ob@1", "--type", "f32", "--eval", "handbook-qa@1", "--strict")
    assert r.code == 1 and r.json["ok"] is False and r.json["exit_code"] == 1
    q = r.json["quality"]
    assert q["tokens"] < 512 and "fewer than 512" in q["warning"] and not r.json["flagged"]


def test_quantize_says_which_dataset_it_chose_and_why(ohome, cli):
    r = cli("--home", ohome, "--json", "quantize", "ob@1", "--type", "f32", "--strict", "--threads", "1")
    assert r.code == 0, r.err
    q = r.json["quality"]
    assert q["eval_data"] == "handbook@1" and q["tokens"] >= 512 and q["warning"] == ""
    assert q["eval_reason"] == "the nearest dataset in ob@1's lineage (its training data); its validation split"


# --- 1c: blank answers shown and counted -------------------------------------------------------------------
def test_blank_note_names_what_the_whitespace_was():
    from appliance.api.format import blank_note

    assert blank_note("\n" * 12) == "(blank answer: 12 newlines)"
    assert blank_note("") == "(blank answer: nothing generated)"
    assert blank_note(" \n") == "(blank answer: 1 newline, 1 space)"
    assert blank_note("\nok\n") is None


BLANK_SUITE = """# appliance eval run FILE --model M
[suite]
name = "blanks"
max_tokens = 4

[[case]]
id = "one"
prompt = "What does the tarn valve do?"
expect = "contains"
answer = "coolant"

[[case]]
id = "two"
prompt = "Who handles a fault?"
expect = "contains"
answer = "office"
"""


def _newlines_only(monkeypatch, cls):
    real = cls.complete

    def complete(self, prompt, chat, max_tokens):  # what the hospital's 40-step model answered
        return {**real(self, prompt, chat, max_tokens), "output": "\n" * 12}

    monkeypatch.setattr(cls, "complete", complete)


def test_eval_shows_and_counts_blank_answers(ohome, cli, tmp_path, monkeypatch):
    from appliance.eval import backends

    suite = tmp_path / "blanks.toml"
    suite.write_text(BLANK_SUITE)
    _newlines_only(monkeypatch, backends.HFBackend)
    r = cli("--home", ohome, "--json", "eval", "run", suite, "--model", "ob@1")
    assert r.code == 0, r.err
    assert r.json["blank"] == 2 and r.json["cases"] == 2
    r = cli("--home", ohome, "eval", "run", suite, "--model", "ob@1")
    assert r.code == 0, r.err
    assert r.out.count("(blank answer: 12 newlines)") == 2, r.out
    assert "warning: 2 of 2 answers were blank" in r.err


def test_generate_and_chat_show_a_blank_answer(ohome, cli, monkeypatch):
    import io

    from appliance.quantize import infer

    r = cli("--home", ohome, "quantize", "ob@1", "--type", "f32", "--threads", "1")
    assert r.code == 0, r.err
    monkeypatch.setattr(infer, "generate", lambda *a, **k: iter(["\n"] * 12))
    r = cli("--home", ohome, "generate", "ob@1:f32", "hello", "--max-tokens", "12")
    assert r.code == 0, r.err
    assert "(blank answer: 12 newlines)" in r.err
    r = cli("--home", ohome, "--json", "generate", "ob@1:f32", "hello", "--max-tokens", "12")
    assert r.json["blank"] is True and r.json["text"] == "\n" * 12
    monkeypatch.setattr(infer, "chat_turn", lambda *a, **k: iter(["\n"] * 3))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    r = cli("--home", ohome, "chat", "ob@1:f32")
    assert r.code == 0, r.err
    assert "(blank answer: 3 newlines)" in r.out


# --- 1a: what each recipe is for -----------------------------------------------------------------------------
def test_train_recipes_say_what_each_is_for_and_how_many_steps(cli):
    r = cli("--json", "train", "recipes")
    assert r.code == 0, r.err
    by = {i["name"]: i for i in r.json["recipes"]}
    assert all(i["purpose"] for i in by.values()), [n for n, i in by.items() if not i["purpose"]]
    assert "blank lines" in by["tiny-dense"]["purpose"] and "400 steps" in by["tiny-dense"]["purpose"]
    assert "300 steps" in by["sft-lora"]["purpose"]
    r = cli("train", "recipes")
    assert r.code == 0 and "smoke test" in r.out
