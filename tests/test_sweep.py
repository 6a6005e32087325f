"""Validation loss during training, early stopping on it, and hyperparameter sweeps ranked by it."""

from __future__ import annotations

import pytest

from appliance.train.sweep import points, rank
from tests.conftest import open_vault
from tests.test_jobs import ended, wait_until

VAL = ["--train.warmup_steps", "2", "--train.eval_every", "4"]


def test_points_grid_in_order_capped_random_distinct_and_seeded():
    space = {"a": [1, 2], "b": ["x", "y", "z"]}
    grid = points(space, "grid", None, 0)
    assert grid[:4] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}]
    assert len(grid) == 6 and points(space, "grid", 2, 0) == grid[:2]
    r = points(space, "random", 4, seed=7)
    assert len(r) == 4 and len({tuple(p.values()) for p in r}) == 4 and r == points(space, "random", 4, seed=7)
    assert points(space, "random", 99, 1) != grid and sorted(map(str, points(space, "random", 99, 1))) == sorted(
        map(str, grid))
    assert [t["trial"] for t in rank([{"trial": 1, "final_val_loss": 3.0}, {"trial": 2, "final_val_loss": None},
                                      {"trial": 3, "final_val_loss": 1.0}])] == [3, 1, 2]


def val_losses(home, run_id):
    from appliance.train.run import metrics

    with open_vault(home, read_only=True) as v:
        return [(m["step"], m["val_loss"]) for m in metrics(v.con, run_id) if m["val_loss"] is not None]


def test_validation_loss_is_the_same_on_one_or_two_processes(train_home, cli):
    one = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--train.max_steps", "8", *VAL,
              "--name", "one")
    two = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--train.max_steps", "8", *VAL,
              "--name", "two", "--gpus", "2")
    assert one.code == 0 and two.code == 0, one.err + two.err
    a, b = val_losses(train_home, "one@1"), val_losses(train_home, "two@1")
    assert [s for s, _ in a] == [s for s, _ in b] == [4, 8]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)
    assert one.json["data"]["validation_rows"] > 0


def test_early_stopping_finishes_the_run_with_its_model(train_home, cli):
    r = cli("--home", train_home, "--json", "train", "run", "tiny-dense", "--train.max_steps", "200",
            "--train.lr", "0.03", "--train.eval_every", "2", "--train.early_stop_patience", "2",
            "--train.warmup_steps", "1", "--name", "es")
    assert r.code == 0, r.err
    d = r.json
    assert d["status"] == "done" and d["steps"] < 200 and d["model_path"]
    vals = [v for _, v in val_losses(train_home, "es@1")]
    assert min(vals[-2:]) >= min(vals)  # the last two measurements did not improve on the best
    node = cli("--home", train_home, "--json", "lineage", "es@1").json["lineage"]
    assert node["attrs"]["metrics"]["stopped_early"] == d["steps"]
    assert node["attrs"]["metrics"]["best_val_loss"] == min(vals)


@pytest.mark.slow
def test_a_sweep_ranks_its_trials_and_records_them_in_lineage(train_home, cli, tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text('name = "lr-sweep"\nrecipe = "tiny-dense"\n'
                 'overrides = ["train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4"]\n'
                 '[space]\n"train.lr" = [0.001, 0.01]\n')
    j = cli("--home", train_home, "--json", "jobs", "sweep", f).json
    assert j["kind"] == "sweep" and [p["train.lr"] for p in j["spec"]["points"]] == [0.001, 0.01]
    done = wait_until(lambda: ended(train_home, j["id"]), timeout=300)
    assert done.status == "done", done.error
    ranking = done.result["ranking"]
    assert sorted(r["run"] for r in ranking) == ["lr-sweep-t1@1", "lr-sweep-t2@1"]
    assert ranking[0]["final_val_loss"] <= ranking[1]["final_val_loss"]
    for r in ranking:  # each trial is judged by the loss of the model it saved; its best is kept too
        vals = [v for _, v in val_losses(train_home, r["run"])]
        assert r["final_val_loss"] == vals[-1] and r["best_val_loss"] == min(vals)
    again = cli("--home", train_home, "jobs", "sweep", f)  # its trials are found by name: one sweep per name
    assert again.code == 2 and "used by an earlier sweep" in again.err
    node = cli("--home", train_home, "--json", "lineage", done.ref).json["lineage"]
    assert node["kind"] == "sweep" and done.ref == "lr-sweep@1"
    assert {(p["id"], p["role"]) for p in node["parents"]} == {("lr-sweep-t1@1", "trial"), ("lr-sweep-t2@1", "trial")}
    assert node["attrs"]["best"]["run"] == ranking[0]["run"]


def test_a_bad_sweep_file_lists_its_problems(train_home, cli, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('name = "x y"\nrecipe = "tiny-dense"\nmethod = "bayes"\ncolor = 1\n[space]\n"train.lr" = []\n')
    r = cli("--home", train_home, "jobs", "sweep", f)
    assert r.code == 2 and r.err.count("\n") == 1
    for part in ("unknown keys: color", "method must be grid or random", "space.train.lr must be a non-empty",
                 "name:"):
        assert part in r.err
    f.write_text('name = "s"\nrecipe = "tiny-dense"\n[space]\n"train.lr" = [0.001]\n')
    assert "train.eval_every is 0" in cli("--home", train_home, "jobs", "sweep", f).err
    f.write_text('name = "s"\nrecipe = "tiny-dense"\noverrides = ["train.eval_every=2"]\n[space]\n'
                 '"train.lr" = [-1.0]\n')
    assert "train.lr must be positive" in cli("--home", train_home, "jobs", "sweep", f).err
    assert cli("--home", train_home, "--json", "jobs", "list", "--all").json["jobs"] == []
