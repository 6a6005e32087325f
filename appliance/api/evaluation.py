"""Evaluation: suites, runs, comparisons, gates, drift and plots."""

from __future__ import annotations

from pathlib import Path


def eval_suites() -> dict:
    """The shipped example suites. Needs no vault."""
    from appliance.eval.suite import SUITES_DIR, load

    rows = [load(str(p)) for p in sorted(SUITES_DIR.glob("*.toml"))]
    return {"suites": [{"name": s.name, "cases": len(s.cases), "metrics": [m.key for m in s.metrics],
                        "path": s.path, "description": s.description} for s in rows]}


def eval_run(v, suite: str, model: str, progress=None) -> dict:
    """Run a suite (shipped name, TOML file, or NAME@N for a dataset's default suite) on a model.

    As `eval run --json`: "ok" is the call's outcome and "checks_ok" whether the suite's thresholds held.
    """
    from appliance import refs
    from appliance.eval.metrics import load_plugins
    from appliance.eval.run import run
    from appliance.eval.suite import from_dataset, load

    load_plugins()
    s = from_dataset(v.con, suite) if refs.is_dataset_suite(suite) else load(suite)
    res = run(v, s, model, **({"progress": progress} if progress else {}))
    return {**res, "ok": True, "checks_ok": res["ok"]}


def eval_runs(v) -> dict:
    from appliance.eval.run import runs

    return {"runs": runs(v.con)}


def eval_compare(v, a: str, b: str) -> dict:
    from appliance.eval.run import compare

    return compare(v.con, a, b)


def eval_gate(v, baseline: str, candidate: str, tolerances: dict[str, float] | None = None,
              tolerance: float = 0.0) -> dict:
    """Whether any metric of `candidate` regresses beyond tolerance against `baseline` ("ok" false if so).

    `tolerances` per metric, `tolerance` for the rest: relative, accuracy in absolute points."""
    from appliance.eval.run import gate

    return gate(v.con, baseline, candidate, tolerances or {}, tolerance)


def eval_drift(v, model: str | None, dataset: str | None = None, baseline: str | None = None, max_change: float = 0.2,
               max_kl: float = 0.05, probes: int = 20, rebaseline: bool = False, deployment: str | None = None,
               window: str = "7d", limits: dict[str, float] | None = None, min_records: int = 20,
               plot: str | Path | None = None) -> dict:
    """A model's answers on fixed probes against its baseline; or, given `deployment`, what that deployment
    served in the recent `window` against the window before it (`eval_drift_served`)."""
    from appliance.eval.drift import check

    if deployment:
        from appliance.api.deployments import eval_drift_served

        return eval_drift_served(v, deployment, window, limits, min_records, plot)

    return check(v, model, dataset, baseline, max_change, max_kl, probes, rebaseline)


def eval_plot(v, runs: list[str], out: str | Path) -> dict:
    """The metrics of eval runs side by side, as a PNG."""
    from appliance.eval.plots import metrics_png
    from appliance.eval.run import load_run
    from appliance.exchange import exported

    with exported(v, "eval.plot", runs, out) as path:
        keys = metrics_png([load_run(v.con, r)[0] for r in runs], path)
    return {"out": str(out), "metrics": keys}


def eval_suite_check(suite: str) -> None:
    """Load a suite file or shipped name (with the metric plugins) as `eval_run` would, raising what it would:
    a malformed suite is refused before a vault is opened. A dataset version (NAME@N) needs the vault, so it
    is left to `eval_run`."""
    from appliance import refs
    from appliance.eval.metrics import load_plugins
    from appliance.eval.suite import load

    if not refs.is_dataset_suite(suite):
        load_plugins()
        load(suite)
