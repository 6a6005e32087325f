"""One resolver for every reference (appliance/refs.py): one rule for bare names, one error for one mistake,
whichever command, job, API function or agent tool is given it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import copy_home, open_vault

FAST = ["train.max_steps=2", "train.warmup_steps=0", "train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def rbase(train_base, tmp_path_factory) -> Path:
    """train_base plus `pilot@1` and `pilot@2` (tiny, 2 steps each), a fake adapter `lora@1` and a fake imported
    GGUF `pilot.q8_0@1` (sent as `pilot@7:q8_0`): lineage nodes only, for resolving."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run
    from appliance.vault import lineage

    h = copy_home(train_base, tmp_path_factory.mktemp("refs"))
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", ["name=pilot", *FAST]))
        run(v, load_recipe("tiny-dense", ["name=pilot", *FAST]))
        with v.transaction():
            lineage.add_node(v.con, "lora@1", "adapter", [("pilot@1", "base")])
            lineage.add_node(v.con, "pilot.q8_0@1", "gguf", [], attrs={"imported_from": "pilot@7:q8_0"})
    return h


@pytest.fixture
def rhome(rbase, tmp_path) -> Path:
    return copy_home(rbase, tmp_path)


# --- the rule, without a vault ------------------------------------------------------------------------------
def test_pick_is_the_rule():
    from appliance.refs import pick

    ids = ["pilot@1", "pilot@10", "pilot@2", "pilot@2:q4_k_m", "pilot@10:q4_k_m", "other@3", "pilot-x@11"]
    assert pick("pilot", ids) == "pilot@10"  # the highest K, as a number
    assert pick("pilot@2", ids) == "pilot@2" and pick("pilot@3", ids) is None
    assert pick("pilot:q4_k_m", ids) == "pilot@10:q4_k_m"  # a GGUF's NAME:TYPE
    assert pick("pilot:q8_0", ids) is None and pick("pilot-", ids) is None and pick("nope", ids) is None


def test_shipped_files_resolve_by_one_rule(tmp_path):
    from appliance import refs
    from appliance.errors import UsageError

    assert refs.recipe("tiny-dense") == refs.RECIPES_DIR / "tiny-dense.toml"
    assert refs.task("asset-risk") == refs.TASKS_DIR / "asset-risk.toml"
    assert refs.suite_file("asset-risk") == refs.TASKS_DIR / "asset-risk.toml"  # a task run as a suite
    assert refs.suite("handbook@3") == "handbook@3"  # a dataset's default suite (checked when given a vault)
    mine = tmp_path / "mine.toml"
    mine.write_text("[suite]\n")
    assert refs.suite(str(mine)) == str(mine) and refs.recipe(str(mine)) == mine
    for fn, what in ((refs.recipe, "recipe"), (refs.task, "task"), (refs.suite_file, "suite")):
        with pytest.raises(UsageError, match=f"no {what} named 'nope'"):
            fn("nope")
        with pytest.raises(UsageError, match=f"no {what} file {tmp_path}/gone.toml"):
            fn(str(tmp_path / "gone.toml"))
        with pytest.raises(UsageError, match=f"no shipped {what} named"):  # an agent names shipped ones only
            fn(str(mine), shipped_only=True)
    assert refs.recipe("tiny-dense", shipped_only=True).is_absolute()


# --- one mistake, one error -----------------------------------------------------------------------------------
def _errors(cli, h: Path, ref: str, tmp_path: Path) -> dict[str, str]:
    """The error line each command gives for model reference `ref`."""
    out = {
        "quantize": cli("--home", h, "quantize", ref, "--type", "f32"),
        "eval run": cli("--home", h, "eval", "run", "handbook@1", "--model", ref),
        "bundle export": cli("--home", h, "bundle", "export", ref, "--sign-key", "k", "--out", tmp_path / "b"),
        "lineage": cli("--home", h, "lineage", ref),
        "jobs submit": cli("--home", h, "jobs", "submit", "sft-lora", "--model.base", ref),
    }
    assert all(r.code == 2 for r in out.values()), {k: (r.code, r.err) for k, r in out.items()}
    return {k: r.err.strip() for k, r in out.items()}


def _api_error(fn) -> str:
    from appliance.errors import ApplianceError, UsageError, one_line

    with pytest.raises(ApplianceError) as e:
        fn()
    assert isinstance(e.value, UsageError)
    return one_line(e.value.message, e.value.hint)


def test_a_missing_version_is_the_same_error_everywhere(rhome, cli, tmp_path):
    from appliance import api

    want = "error: no model pilot@9; pilot has pilot@1, pilot@2; list them with `appliance train models`"
    errors = _errors(cli, rhome, "pilot@9", tmp_path)
    assert set(errors.values()) == {want}, errors
    with open_vault(rhome) as v:
        calls = [lambda: api.quantize(v, "pilot@9"), lambda: api.eval_run(v, "handbook@1", "pilot@9"),
                 lambda: api.jobs_quantize(v, "pilot@9"), lambda: api.jobs_eval(v, "handbook@1", "pilot@9"),
                 lambda: api.lineage(v, "pilot@9"), lambda: api.bundle_export(v, "pilot@9", "k", tmp_path / "b"),
                 lambda: api.jobs_submit(v, "sft-lora", ["model.base=pilot@9"])]
        assert {_api_error(c) for c in calls} == {want}
        assert not api.jobs_list(v, all=True)["jobs"]  # refused when submitted, not when run


def test_an_unknown_model_is_the_same_error_for_every_model_reference(rhome, cli, tmp_path):
    from appliance import api

    want = "error: no model nope@1; models here: pilot@2, pilot@1; list them with `appliance train models`"
    assert cli("--home", rhome, "quantize", "nope@1").err.strip() == want
    assert cli("--home", rhome, "eval", "run", "handbook@1", "--model", "nope@1").err.strip() == want
    with open_vault(rhome) as v:
        calls = [lambda: api.quantize(v, "nope@1"), lambda: api.eval_run(v, "handbook@1", "nope@1"),
                 lambda: api.jobs_quantize(v, "nope@1"), lambda: api.jobs_eval(v, "handbook@1", "nope@1"),
                 lambda: api.eval_drift(v, "nope@1")]
        assert {_api_error(c) for c in calls} == {want}
        # a bare name that names nothing: the same words
        assert _api_error(lambda: api.quantize(v, "nope")) == want.replace("nope@1", "nope")
    r = cli("--home", rhome, "lineage", "nope@1")
    assert r.code == 2 and r.err.startswith("error: no lineage node nope@1;")


def test_a_missing_dataset_version_is_the_same_error_everywhere(rhome, cli, tmp_path):
    from appliance import api

    want = "error: no dataset version handbook@9; handbook has handbook@1; list them with `appliance vault datasets`"
    rs = [cli("--home", rhome, "quantize", "pilot@2", "--eval", "handbook@9"),
          cli("--home", rhome, "eval", "run", "handbook@9", "--model", "pilot@2"),
          cli("--home", rhome, "vault", "export", "handbook@9", "--out", tmp_path / "x.jsonl"),
          cli("--home", rhome, "lineage", "handbook@9"),
          cli("--home", rhome, "jobs", "submit", "tiny-dense", "--set", "data.datasets=[\"handbook@9\"]")]
    assert [(r.code, r.err.strip()) for r in rs] == [(2, want)] * len(rs)
    with open_vault(rhome) as v:
        calls = [lambda: api.jobs_eval(v, "handbook@9", "pilot@2"),
                 lambda: api.jobs_quantize(v, "pilot@2", eval="handbook@9"),
                 lambda: api.bundle_export(v, "handbook@9", "k", tmp_path / "b")]
        assert {_api_error(c) for c in calls} == {want}
        assert _api_error(lambda: api.vault_records(v, "nope")).startswith(
            "error: no dataset version nope; datasets here: ")


def test_the_wrong_kind_is_named(rhome, cli):
    r = cli("--home", rhome, "quantize", "handbook@1")
    assert r.code == 2 and "handbook@1 is a dataset version, not a model" in r.err
    for args in (["quantize", "lora@1"], ["eval", "run", "handbook@1", "--model", "lora@1"], ["quantize", "lora"]):
        r = cli("--home", rhome, *args)
        assert r.code == 2 and "lora@1 is a LoRA adapter, not a model" in r.err, r.err
        assert "appliance train merge lora@1" in r.err


# --- bare names: the newest NAME@K, in each --------------------------------------------------------------
def test_bare_names_take_the_newest_version(rhome, cli):
    from appliance import refs
    from appliance.errors import UsageError
    from appliance.jobs import queue

    with open_vault(rhome) as v:
        assert refs.model(v.con, "pilot") == "pilot@2" and refs.node(v.con, "pilot") == "pilot@2"
        assert refs.dataset(v.con, "handbook") == "handbook@1" and refs.tokenizer(v.con, "handbook-bpe") == \
            "handbook-bpe@1"
        assert refs.gguf(v.con, "pilot.q8_0") == "pilot.q8_0@1"
        # an import's id at its sender is no alias here: this site has a `pilot` of its own, whose names a
        # sender never takes (tests/test_security_refs.py); the import answers to its local id
        for sender_id in ("pilot@7:q8_0", "pilot@2:q8_0"):
            with pytest.raises(UsageError):
                refs.gguf(v.con, sender_id)
        assert refs.model(v.con, "pilot.q8_0@1", gguf=True) == "pilot.q8_0@1"
        assert refs.suite("handbook@1", v.con) == "handbook@1"
        # jobs pin what the name stands for when they are queued (queue.submit: no runner is started)
        q = queue.submit(v, "quantize", {"model": "pilot", "type": "f32", "eval": "handbook"})
        e = queue.submit(v, "eval", {"suite": "handbook@1", "model": "pilot"})
        assert (q.spec["model"], q.spec["eval"], e.spec["model"]) == ("pilot@2", "handbook@1", "pilot@2")
    r = cli("--home", rhome, "--json", "lineage", "pilot")
    assert r.code == 0 and r.json["lineage"]["id"] == "pilot@2"
    r = cli("--home", rhome, "--json", "eval", "run", "handbook@1", "--model", "pilot")  # was refused before
    assert r.code == 0, r.err
    assert r.json["model"] == "pilot@2"
    r = cli("--home", rhome, "--json", "eval", "compare", r.json["id"], "eval-handbook-default")
    assert r.code == 0, r.err
