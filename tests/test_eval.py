"""`appliance eval`: suites, the same suite on transformers and llama.cpp, compare, gate, drift, plots."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import copy_home, open_vault


@pytest.fixture(scope="module")
def ebase(train_base, tmp_path_factory) -> Path:
    """train_base plus `good@1` (16 steps) and `weak@1` (2 steps) on the handbook, and good@1 as f32 GGUF."""
    from appliance.quantize.stage import quantize
    from appliance.train.config import load_recipe
    from appliance.train.run import run

    h = copy_home(train_base, tmp_path_factory.mktemp("eval"))
    fast = ["train.checkpoint_every=1000", "train.warmup_steps=1"]
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", ["name=good", "train.max_steps=16", *fast]))
        run(v, load_recipe("tiny-dense", ["name=weak", "train.max_steps=2", *fast]))
        quantize(v, "good@1", "f32", eval_tokens=256, threads=1)
    return h


@pytest.fixture
def ehome(ebase, tmp_path) -> Path:
    return copy_home(ebase, tmp_path)


def test_every_shipped_suite_loads():
    from appliance.eval.suite import SUITES_DIR, load

    suites = sorted(SUITES_DIR.glob("*.toml"))
    assert suites
    for p in suites:
        s = load(str(p))
        assert s.cases or s.metrics
        assert p.read_text().startswith("# appliance eval run")


def test_a_malformed_suite_lists_every_problem_with_its_line(tmp_path, cli):
    bad = tmp_path / "bad.toml"
    bad.write_text(textwrap.dedent("""\
        [suite]
        name = "bad"

        [[case]]
        id = "a"
        prompt = "Hello"
        expect = "sounds-like"

        [[case]]
        id = "a"
        prompt = ""
        expect = "regex"
        answer = "(unclosed"

        [[metric]]
        type = "custom"
        name = "no_such_metric"

        [[metric]]
        type = "perplexity"
        colour = "blue"

        [[case]]
        id = "b"
        prompt = "Say it"
        expect = "contains"

        [[metric]]
        type = "custom"
        """))
    r = cli("eval", "run", bad, "--model", "x@1")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1
    problems = r.err.split("; ")
    for where, what in ((7, "expect 'sounds-like'"), (10, "case id 'a' is used twice"), (11, "prompt must be"),
                        (13, "not a valid regex"), (17, "unknown metric 'no_such_metric'"),
                        (21, "unknown key 'colour'"), (19, "perplexity needs dataset"),
                        (23, "case b: a non-empty answer is required"), (28, "unknown metric ''")):
        assert any(p.split("bad.toml:", 1)[-1].startswith(f"{where}: ") and what in p for p in problems), (where, what)
    single = tmp_path / "single.toml"
    single.write_text('[suite]\nname = "x"\nmax_tokens = 0\n\n[case]\nprompt = "hi"\n')
    r = cli("eval", "run", single, "--model", "x@1")
    assert r.code == 1 and "single.toml:3: suite.max_tokens" in r.err and "single.toml:5: write [[case]]" in r.err
    broken = tmp_path / "broken.toml"
    broken.write_text('[suite]\nname = "x"\nthis is not toml\n')
    r = cli("eval", "run", broken, "--model", "x@1")
    assert r.code == 1 and "broken.toml:3: not valid TOML" in r.err


def test_scoring_rules():
    from appliance.eval.metrics import score
    from appliance.eval.suite import Case

    assert score(Case("a", "p", "exact", "yes"), " yes ") and not score(Case("a", "p", "exact", "yes"), "yes!")
    assert score(Case("a", "p", "contains", "Valve"), "the valve isolates")
    assert score(Case("a", "p", "regex", r"\d{3}"), "code 123") and not score(Case("a", "p", "regex", r"\d{3}"), "12")
    assert score(Case("a", "p", "json"), '{"a": 1}') and not score(Case("a", "p", "json"), "{a: 1}")
    schema = {"type": "object", "required": ["status"]}
    assert score(Case("a", "p", "json_schema", schema=schema), '{"status": "ok"}')
    assert not score(Case("a", "p", "json_schema", schema=schema), '{"state": "ok"}')


def test_paired_bootstrap_interval():
    from appliance.eval.run import bootstrap_ci

    lo, hi = bootstrap_ci([1.0] * 10 + [0.0] * 10)
    assert 0.2 < lo < 0.5 < hi < 0.8  # the mean of 20 coin flips: about +-0.22
    lo, hi = bootstrap_ci([0.1 + 0.01 * i for i in range(20)])
    assert 0.15 < lo < 0.195 < hi < 0.24


def _run(cli, h, *args) -> dict:
    r = cli("--home", h, "--json", "eval", "run", *args)
    assert r.code == 0, r.err + r.out
    return r.json


def test_the_same_suite_on_transformers_and_llama_cpp(ehome, cli):
    a = _run(cli, ehome, "handbook-checks", "--model", "good@1")
    b = _run(cli, ehome, "handbook-checks", "--model", "good@1:f32")
    assert a["backend"] == "transformers" and b["backend"] == "llama.cpp"
    assert a["id"] == "eval-handbook-checks@1" and b["id"] == "eval-handbook-checks@2"
    # an f32 GGUF is the same model: same greedy answers, same choices, same perplexity
    assert [c["output"] for c in a["case_results"]] == [c["output"] for c in b["case_results"]]
    assert [c["passed"] for c in a["case_results"]] == [c["passed"] for c in b["case_results"]]
    assert abs(a["metrics"]["perplexity"] / b["metrics"]["perplexity"] - 1) < 1e-3
    assert a["metrics"]["vocab_coverage"] == b["metrics"]["vocab_coverage"] > 0.5
    assert {"latency_p95_ms", "ttft_p50_ms", "tokens_per_s", "mean_output_words"} <= set(a["metrics"])
    tree = cli("--home", ehome, "--json", "lineage", a["id"]).json["lineage"]
    assert tree["kind"] == "eval" and {(p["id"], p["role"]) for p in tree["parents"]} == {
        ("good@1", "model"), ("handbook@1", "data")}
    with open_vault(ehome, read_only=True) as v:
        assert v.con.execute("SELECT count(*) FROM eval_cases WHERE run = ?", [a["id"]]).fetchone()[0] == 4
    cmp = cli("--home", ehome, "--json", "eval", "compare", a["id"], b["id"]).json
    assert cmp["changed"] == [] and cmp["wins"] == [] and cmp["losses"] == []
    assert cmp["metrics"]["accuracy"]["ci95"] == [0.0, 0.0]
    runs = cli("--home", ehome, "--json", "eval", "runs").json["runs"]
    assert [r["id"] for r in runs] == [a["id"], b["id"]]


def test_gate_blocks_a_regression_and_passes_a_tie(ehome, cli):
    good = _run(cli, ehome, "handbook@1", "--model", "good@1")  # the dataset's default suite
    assert good["suite"] == "handbook-default" and good["cases"] >= 10
    assert all(c["case"].startswith("cloze-") for c in good["case_results"])
    weak = _run(cli, ehome, "handbook@1", "--model", "weak@1")
    assert weak["metrics"]["perplexity"] > good["metrics"]["perplexity"]
    r = cli("--home", ehome, "--json", "eval", "gate", "--baseline", good["id"], "--candidate", weak["id"])
    assert r.code == 1 and "perplexity" in {x["metric"] for x in r.json["regressions"]}
    assert r.json["ok"] is False
    tie = cli("--home", ehome, "eval", "gate", "--baseline", good["id"], "--candidate", good["id"])
    assert tie.code == 0 and "gate passed" in tie.out
    loose = cli("--home", ehome, "--json", "eval", "gate", "--baseline", good["id"], "--candidate", weak["id"],
                "--tolerance", "1000", "--tolerance", "accuracy=1")
    assert loose.code == 0 and loose.json["ok"] is True
    assert cli("--home", ehome, "eval", "gate", "--baseline", good["id"], "--candidate", weak["id"],
               "--tolerance", "lots").code == 2


def test_thresholds_strict_and_custom_metrics(ehome, cli, tmp_path, monkeypatch):
    plugin = tmp_path / "site_metrics.py"
    plugin.write_text(textwrap.dedent("""\
        from appliance.eval.metrics import register

        @register("answered")
        def answered(cases):
            return sum(bool(c["output"].strip()) for c in cases) / len(cases)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("APPLIANCE_EVAL_PLUGINS", "site_metrics")
    suite = tmp_path / "strict.toml"
    suite.write_text(textwrap.dedent("""\
        # appliance eval run strict.toml --model good@1
        [[case]]
        prompt = "The HALO permit"
        expect = "contains"
        answer = "zzzz-not-there"

        [[metric]]
        type = "perplexity"
        dataset = "handbook"
        max = 1.0

        [[metric]]
        type = "custom"
        name = "answered"
        min = 0.0
        """))
    r = cli("--home", ehome, "--json", "eval", "run", suite, "--model", "good@1", "--strict")
    assert r.code == 1 and r.json["ok"] is False
    assert {(c["metric"], c["ok"]) for c in r.json["checks"]} == {("perplexity", False), ("answered", True)}
    outs = [c["output"] for c in r.json["case_results"]]
    assert r.json["metrics"]["answered"] == sum(bool(o.strip()) for o in outs) / len(outs)
    lax = cli("--home", ehome, "--json", "eval", "run", suite, "--model", "good@1")  # without --strict
    assert lax.code == 0 and lax.json["ok"] is True and lax.json["checks_ok"] is False
    r = cli("--home", ehome, "eval", "run", suite, "--model", "nope@3")
    assert r.code == 2 and "no model nope@3" in r.err
    # models that cannot load: one line, exit 1
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    r = cli("--home", ehome, "eval", "run", suite, "--model", fake)
    assert r.code == 1 and "is not a GGUF file" in r.err and len(r.err.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    r = cli("--home", ehome, "eval", "run", suite, "--model", broken)
    assert r.code == 1 and "cannot load model" in r.err and len(r.err.strip().splitlines()) == 1


def test_drift_against_a_stored_baseline(ehome, cli):
    first = cli("--home", ehome, "--json", "eval", "drift", "--model", "good@1", "--probes", "8").json
    assert first["recorded"] and first["dataset"] == "handbook@1" and first["probes"] == 8
    same = cli("--home", ehome, "--json", "eval", "drift", "--model", "good@1:f32", "--baseline", "good@1")
    assert same.code == 0 and same.json["answer_change_rate"] == 0 and same.json["mean_kl"] < 1e-4
    other = cli("--home", ehome, "--json", "eval", "drift", "--model", "weak@1", "--baseline", "good@1")
    assert other.code == 1 and other.json["ok"] is False
    assert other.json["mean_kl"] > 0.05  # a 2-step model predicts differently, whatever its greedy answers
    log = cli("--home", ehome, "--json", "audit", "log", "--action", "eval.drift*").json["entries"]
    assert [e["action"] for e in log] == ["eval.drift.baseline", "eval.drift", "eval.drift"]


def test_plots_are_png(ehome, cli, tmp_path):
    a = _run(cli, ehome, "handbook-checks", "--model", "good@1")["id"]
    b = _run(cli, ehome, "handbook-checks", "--model", "weak@1")["id"]
    r = cli("--home", ehome, "--json", "eval", "plot", a, b, "--out", tmp_path / "m.png")
    assert r.code == 0 and "perplexity" in r.json["metrics"]
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("--home", ehome, "--json", "train", "plot", "good@1", "weak@1", "--out", tmp_path / "l.png").code == 0
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    r = cli("--home", ehome, "train", "plot", "nothing@1", "--out", tmp_path / "x.png")
    assert r.code == 2 and not (tmp_path / "x.png").exists()


def test_the_vault_is_free_while_a_suite_runs(ehome):
    import subprocess

    from appliance.eval.run import run
    from appliance.eval.suite import load
    from tests.conftest import PY, python_env

    seen = []

    def progress(stage, done, total):
        if stage == "cases" and done == 1 and not seen:  # the model is at work: another process may attach
            seen.append(subprocess.run([PY, "-m", "appliance", "--home", str(ehome), "vault", "datasets"],
                                       env=python_env(), capture_output=True, text=True, timeout=120))

    with open_vault(ehome) as v:
        res = run(v, load("handbook-checks"), "good@1", progress=progress)
        assert v.con.execute("SELECT count(*) FROM eval_runs WHERE id = ?", [res["id"]]).fetchone()[0] == 1
    assert seen and seen[0].returncode == 0 and "handbook" in seen[0].stdout, seen[0].stderr


def test_suite_json_is_one_object(ehome, cli):
    r = cli("--home", ehome, "--json", "eval", "suites")
    assert [s["name"] for s in json.loads(r.out)["suites"]] == ["handbook-answers", "handbook-checks"]


def test_a_model_given_by_path(ehome, cli):
    """A GGUF file or model directory outside the vault's lineage runs, and its run records no model edge."""
    from appliance import sealed

    gguf = next(p.with_name(p.name.removesuffix(sealed.SUFFIX))  # sealed at rest: given by its plaintext name
                for p in (ehome / "artifacts" / "gguf").rglob("*.gguf" + sealed.SUFFIX))
    assert sealed.exists(gguf) and not gguf.exists()
    r = _run(cli, ehome, "handbook-checks", "--model", gguf)
    assert r["model"] == str(gguf.resolve()) and r["backend"] == "llama.cpp"
    tree = cli("--home", ehome, "--json", "lineage", r["id"]).json["lineage"]
    assert [(p["id"], p["role"]) for p in tree["parents"]] == [("handbook@1", "data")]
    d = cli("--home", ehome, "eval", "drift", "--model", gguf)
    assert d.code == 2 and "pass --dataset" in d.err
    assert cli("--home", ehome, "eval", "drift", "--model", gguf, "--dataset", "handbook@1").code == 0


def test_an_eval_report_travels_as_a_signed_bundle(ehome, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key pass 1234")
    run = _run(cli, ehome, "handbook-checks", "--model", "good@1")["id"]
    assert cli("--home", ehome, "keys", "generate", "--name", "lab").code == 0
    pub = ehome / "keys" / "lab.pub"
    out = tmp_path / "report.bundle"
    assert cli("--home", ehome, "bundle", "export", run, "--sign-key", "lab", "--out", out).code == 0
    assert cli("--home", ehome, "trust", "add", pub, "--name", "lab", "--kinds", "eval").code == 0
    r = cli("--home", ehome, "--json", "bundle", "import", out)
    assert r.code == 0 and r.json["kind"] == "eval" and r.json["id"] == "eval-handbook-checks@2", r.err
    cmp = cli("--home", ehome, "--json", "eval", "compare", run, r.json["id"]).json
    assert cmp["changed"] == [] and cmp["metrics"]["accuracy"]["delta"] == 0
    tree = cli("--home", ehome, "--json", "lineage", r.json["id"]).json["lineage"]
    assert tree["attrs"]["imported_from"] == run and tree["attrs"]["bundle"]["signer"] == "lab"
