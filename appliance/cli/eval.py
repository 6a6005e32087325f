"""`appliance eval run|runs|compare|gate|suites`: thin over `appliance.api` (evaluation)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import api
from appliance.api.format import blank_note, change, num
from appliance.cli.app import Ctx, cli, command
from appliance.cli.output import StageProgress, err, out, table
from appliance.errors import ApplianceError, UsageError


class ChecksFailed(ApplianceError):
    """The run finished, and some thresholds or the gate failed; the report was already printed."""

    json_emitted = True


@cli.group("eval")
def eval_group():
    """Operator-defined suites on models and GGUFs; compare runs and gate releases."""


@command(eval_group, "suites")
def eval_suites_cmd(c: Ctx):
    """The shipped example suites."""
    data = api.eval_suites()["suites"]
    c.emit({"suites": data}, lambda: table(["suite", "cases", "metrics", "description"],
                                            [[d["name"], d["cases"], ", ".join(d["metrics"]), d["description"]]
                                             for d in data]))


@command(eval_group, "run")
@click.argument("suite")
@click.option("--model", "model", required=True, help="Model id, GGUF id, model directory or .gguf file.")
@click.option("--strict", is_flag=True, help="Exit 1 when a threshold in the suite is not met.")
def eval_run_cmd(c: Ctx, suite, model, strict):
    """Run SUITE on a model; every case is stored in the vault.

    SUITE is a shipped name, a TOML file, or a dataset version NAME@N for its default suite (held-out
    perplexity and cloze questions cut from its documents).
    """
    api.eval_suite_check(suite)  # a malformed suite is reported before the passphrase is asked
    bar = StageProgress(not c.json)
    with c.open_vault() as v:
        try:
            res = api.eval_run(v, suite, model, progress=bar)
        finally:
            bar.stop()
    # "ok" is the command's outcome (the contract); whether the thresholds held is "checks_ok"
    failure = ChecksFailed(f"{res['id']}: {sum(not k['ok'] for k in res['checks'])} threshold(s) not met",
                           "see the checks above") if strict and not res["checks_ok"] else None
    data = dict(res)
    if failure:
        data.update(ok=False, error=failure.message, hint=failure.hint, exit_code=1)

    def human():
        out.print(f"[bold]{res['id']}[/]  {res['suite']} on {res['model']} ({res['backend']}): "
                  f"{res['passed']}/{res['cases']} cases passed")
        table(["case", "passed", "output"], [[r["case"], "yes" if r["passed"] else "no",
                                              blank_note(r["output"] or "") or " ".join(r["output"].split())[:70]]
                                             for r in res["case_results"]])
        if res.get("blank"):
            err.print(f"warning: {res['blank']} of {res['cases']} answers were blank (empty or whitespace only): "
                      "the model may need more training steps (docs/TRAINING.md, Recipes)", markup=False)
        m = {k: v for k, v in res["metrics"].items() if not isinstance(v, list) and not k.endswith("_tokens")}
        out.print("metrics: " + ", ".join(f"{k} {num(v)}" for k, v in m.items()))
        for k in res["checks"]:
            value = num(k["value"]) if isinstance(k["value"], int | float) else "not measured"
            (out if k["ok"] else err).print(f"{'ok' if k['ok'] else 'FAILED'}: {k['metric']} {value} "
                                            f"(needs {k['limit']})", markup=False)

    c.emit(data, human)
    if failure:
        raise failure


@command(eval_group, "runs")
def eval_runs_cmd(c: Ctx):
    """Every stored evaluation run."""
    with c.open_vault(read_only=True) as v:
        rows = api.eval_runs(v)["runs"]
    c.emit({"runs": rows}, lambda: table(
        ["run", "suite", "model", "backend", "passed", "checks", "created"],
        [[r["id"], r["suite"], r["model"], r["backend"], f"{r['passed']}/{r['cases']}",
          "ok" if r["ok"] else "FAILED", r["created"]] for r in rows])
        if rows else out.print("no evaluation runs yet: `appliance eval run SUITE --model ID`"))


def _compare_human(r: dict) -> None:
    rows = []

    def signed(x) -> str:
        return ("+" if isinstance(x, int | float) and x > 0 else "") + num(x)

    for k, m in r["metrics"].items():
        ci = m.get("ci95") or m.get("ci95_mean_nll")
        what = " (mean NLL)" if m.get("ci95_mean_nll") else ""
        a, b = m["a"], m["b"]
        rel = f" ({(b - a) / abs(a):+.0%})".replace("%", " %") if isinstance(a, int | float) and isinstance(
            b, int | float) and a else ""
        rows.append([k, num(a), num(b), signed(m["delta"]) + rel,
                     f"[{signed(ci[0])}, {signed(ci[1])}]{what}" if ci else ""])
    table(["metric", r["a"], r["b"], "delta", "95% CI (paired bootstrap)"], rows)
    out.print(f"wins {len(r['wins'])}: {', '.join(r['wins']) or '-'}; losses {len(r['losses'])}: "
              f"{', '.join(r['losses']) or '-'}; answers changed: {', '.join(r['changed']) or '-'}")


@command(eval_group, "compare")
@click.argument("a")
@click.argument("b")
def eval_compare_cmd(c: Ctx, a, b):
    """Per-metric deltas B - A with paired bootstrap intervals, wins, losses and changed answers."""
    with c.open_vault(read_only=True) as v:
        r = api.eval_compare(v, a, b)
    c.emit(r, lambda: _compare_human(r))


@command(eval_group, "gate")
@click.option("--baseline", required=True, help="The eval run of the released model.")
@click.option("--candidate", required=True, help="The eval run of the model to release.")
@click.option("--tolerance", "tolerances", multiple=True, metavar="[METRIC=]VALUE",
              help="Allowed regression: relative (0.02 = 2 %), accuracy in absolute points. Repeatable.")
def eval_gate_cmd(c: Ctx, baseline, candidate, tolerances):
    """Exit 1 when any metric of the candidate regresses beyond tolerance (for release scripts)."""
    per, default = {}, 0.0
    for t in tolerances:
        key, _, val = t.rpartition("=")
        try:
            value = float(val)
        except ValueError:
            raise UsageError(f"--tolerance {t!r} is not [METRIC=]NUMBER", "e.g. --tolerance 0.02 or "
                                                                          "--tolerance accuracy=0.05") from None
        if key:
            per[key] = value
        else:
            default = value
    with c.open_vault(read_only=True) as v:
        r = api.eval_gate(v, baseline, candidate, per, default)
    failure = ChecksFailed(f"{candidate} regresses on {', '.join(x['metric'] for x in r['regressions'])} "
                           f"against {baseline}", "see the table above") if not r["ok"] else None
    data = dict(r)
    if failure:
        data.update(ok=False, error=failure.message, hint=failure.hint, exit_code=1)

    def human():
        _compare_human(r)
        for x in r["regressions"]:
            err.print(f"regression: {x['metric']} {change(x['baseline'], x['candidate'])} "
                      f"(tolerance {num(x['tolerance'])})", markup=False)
        if r["ok"]:
            out.print("gate passed: no metric regressed beyond tolerance")

    c.emit(data, human)
    if failure:
        raise failure


@command(eval_group, "drift")
@click.option("--model", "model", default=None, help="The model or GGUF to check on fixed probes.")
@click.option("--dataset", default=None, help="Where the probes come from (default: the model's own data).")
@click.option("--baseline", "name", default=None, help="Baseline name (default: the model id). The first "
                                                       "check records it.")
@click.option("--max-change", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Largest allowed share of probes whose greedy answer changed.")
@click.option("--max-kl", type=click.FloatRange(0), default=0.05, show_default=True,
              help="Largest allowed mean KL divergence of next-token distributions.")
@click.option("--probes", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--rebaseline", is_flag=True, help="Record a new baseline instead of checking.")
@click.option("--deployment", default=None, help="Check what this deployment served instead (no model is run).")
@click.option("--window", default="7d", show_default=True, help="With --deployment: the recent window (30m, 12h, "
                                                                "7d, 2w), compared with the window before it.")
@click.option("--limit", "limits", multiple=True, metavar="METRIC=VALUE",
              help="With --deployment: a drift limit (js_divergence, unseen_rate, length_change, refusal_change, "
                   "error_change, answer_change, probe_kl). Repeatable.")
@click.option("--min-records", type=click.IntRange(1), default=20, show_default=True,
              help="With --deployment: fewer records in a window and nothing is judged.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="With --deployment: also draw the measures against their limits (PNG).")
def eval_drift_cmd(c: Ctx, model, dataset, name, max_change, max_kl, probes, rebaseline, deployment, window, limits,
                   min_records, plot):
    """Compare a model's answers and next-token distributions on fixed probes with the stored baseline; or,
    with --deployment, what a deployment served in the recent window with the window before it. Exit 1 on
    drift (for scheduled checks)."""
    if bool(model) == bool(deployment):
        raise UsageError("give --model or --deployment", "--model M checks probes; --deployment D --window 7d "
                                                         "checks what D served")
    if deployment:
        return _served_drift(c, deployment, window, limits, min_records, plot)
    with c.open_vault() as v:
        r = api.eval_drift(v, model, dataset, name, max_change, max_kl, probes, rebaseline)
    failure = ChecksFailed(f"{r['model']} drifted from baseline {r['baseline']}", "see the numbers above"
                           ) if not r["ok"] else None
    data = dict(r)
    if failure:
        data.update(ok=False, error=failure.message, hint=failure.hint, exit_code=1)

    def human():
        if r["recorded"]:
            out.print(f"baseline {r['baseline']} recorded: {r['probes']} probes from {r['dataset']} on {r['model']}")
            return
        (out if r["ok"] else err).print(
            f"{'ok' if r['ok'] else 'DRIFT'}: {r['model']} vs baseline {r['baseline']} ({r['baseline_model']}): "
            f"answers changed {r['answer_change_rate']:.0%} (max {max_change:.0%}), mean KL {num(r['mean_kl'])} "
            f"(max {num(max_kl)}), worst probe KL {num(r['max_kl'])}", markup=False)

    c.emit(data, human)
    if failure:
        raise failure


def _metric_values(given: tuple[str, ...], flag: str) -> dict[str, float]:
    per = {}
    for t in given:
        key, _, val = t.partition("=")
        try:
            per[key] = float(val)
        except ValueError:
            raise UsageError(f"{flag} {t!r} is not METRIC=NUMBER", f"e.g. {flag} refusal_rate=0.05") from None
    return per


def _served_drift(c: Ctx, deployment, window, limits, min_records, plot):
    per = _metric_values(limits, "--limit")
    with c.open_vault() as v:
        r = api.eval_drift(v, None, deployment=deployment, window=window, limits=per, min_records=min_records,
                           plot=plot)
    failure = ChecksFailed(f"{deployment} drifted: {', '.join(r['drifted'])}", "see the numbers above"
                           ) if not r["ok"] else None
    data = dict(r)
    if failure:
        data.update(ok=False, error=failure.message, hint=failure.hint, exit_code=1)

    def human():
        out.print(f"{deployment}: {r['recent']['records']} records in {r['window']['start']} .. {r['window']['end']}, "
                  f"{r['earlier']['records']} in the window before")
        table(["metric", "value", "limit", ""],
              [[k, num(x) if x is not None else "-", num(r["limits"][k]), "DRIFT" if k in r["drifted"] else ""]
               for k, x in r["metrics"].items()])
        if not r["enough"]:
            out.print(f"not judged: a window holds fewer than {min_records} records")
        elif r["ok"]:
            out.print("ok: no drift past the limits")
        if r.get("plot"):
            out.print(f"wrote {r['plot']}")

    c.emit(data, human)
    if failure:
        raise failure


@command(eval_group, "ab")
@click.argument("deployment")
@click.option("--promote", is_flag=True, help="Make the candidate the deployment's model if the verdict passes.")
@click.option("--min-requests", type=click.IntRange(1), default=30, show_default=True,
              help="Answered requests each arm needs before a verdict.")
@click.option("--tolerance", "tolerances", multiple=True, metavar="METRIC=VALUE",
              help="Allowed worsening of refusal_rate, error_rate (absolute, default 0.02) or rating (points, "
                   "default 0.25). Repeatable.")
@click.option("--max-latency-increase", type=click.FloatRange(0), default=None,
              help="Gate latency too: the largest relative increase allowed (0.2 = 20 %).")
@click.option("--suite", "suites", multiple=True, metavar="SUITE",
              help="Score served answers to this suite's questions (repeatable; default: every shipped suite).")
def eval_ab_cmd(c: Ctx, deployment, promote, min_requests, tolerances, max_latency_increase, suites):
    """Compare DEPLOYMENT's model and candidate on what they served: latency, answer length, refusal rate,
    errors, feedback ratings and, for answers to suite questions (or requests with a reference), the suites'
    accuracy, with 95 % intervals and a verdict. Exit 1 unless the verdict passes."""
    per = _metric_values(tolerances, "--tolerance")
    with c.open_vault() as v:
        r = api.eval_ab(v, deployment, min_requests, per, max_latency_increase, promote, list(suites) or None)
    failure = ChecksFailed(f"{deployment}: A/B verdict {r['verdict']} ({r['reason']})"
                           + ("; not promoted" if promote else ""), "see the table above") if not r["passed"] else None
    data = dict(r)
    if failure:
        data.update(ok=False, error=failure.message, hint=failure.hint, exit_code=1)

    def human():
        a, b = r["arms"]["model"], r["arms"]["candidate"]
        out.print(f"{deployment}: {r['model']} ({a['requests']} requests, {a['ratings']} rated) vs {r['candidate']} "
                  f"({b['requests']} requests, {b['ratings']} rated)")

        def cell(x):
            return "-" if x is None else num(x)

        table(["metric", "model", "candidate", "delta", "95% CI", "gated"],
              [[k, cell(m["model"]), cell(m["candidate"]), cell(m["delta"]),
                f"[{cell(m['ci95'][0])}, {cell(m['ci95'][1])}]" if m["ci95"] else "-", "yes" if m["gated"] else "no"]
               for k, m in r["metrics"].items()])
        (out if r["passed"] else err).print(f"verdict: {r['verdict']} ({r['reason']})", markup=False)
        if r["promoted"]:
            out.print(f"promoted: {deployment} now serves {r['candidate']}")

    c.emit(data, human)
    if failure:
        raise failure


@command(eval_group, "plot")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
def eval_plot_cmd(c: Ctx, runs, out_path):
    """Plot the metrics of evaluation runs side by side (PNG)."""
    with c.open_vault() as v:  # writable: the export is audited
        res = api.eval_plot(v, list(runs), out_path)
    c.emit(res, f"wrote {out_path} ({len(res['metrics'])} metrics, {len(runs)} runs)")
