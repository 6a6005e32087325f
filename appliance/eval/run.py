"""`appliance eval run|compare|gate`: run a suite on a model, store every case, compare two runs.

A run is a lineage node `eval-SUITE@K` (parents: the model, and the datasets its metrics read) with its
summary in `eval_runs` and one row per case in `eval_cases`, all inside the vault.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from appliance.db_time import utcnow
from appliance.errors import ApplianceError, UsageError
from appliance.eval import metrics as M
from appliance.eval.suite import Suite

Progress = Callable[[str, int, int], None]


class EvalError(ApplianceError):
    """An evaluation could not run as asked."""


def resolve_model(vault, ref: str) -> tuple[str, str, Path]:
    """(id, backend kind, path) for a model id, a GGUF id, a model directory or a .gguf file."""
    p = Path(ref)
    if p.suffix == ".gguf" and p.is_file():
        return str(p), "gguf", p
    if p.is_dir() and (p / "config.json").is_file():
        return str(p), "hf", p
    row = vault.con.execute("SELECT id, kind, attrs FROM lineage_nodes WHERE id = ?", [ref]).fetchone()
    if row is None or row[1] not in ("model", "gguf"):
        raise UsageError(f"no model {ref}", "pass a model or GGUF id (`appliance train models`, "
                                            "`appliance quantize --list`), a model directory or a .gguf file")
    if row[1] == "model":
        return row[0], "hf", vault.home.artifacts / "models" / row[0]
    from appliance.quantize.infer import locate

    return row[0], "gguf", locate(row[0], vault.home.artifacts)


def open_backend(kind: str, path: Path):
    from appliance.eval.backends import GGUFBackend, HFBackend

    try:
        return GGUFBackend(path) if kind == "gguf" else HFBackend(path)
    except ApplianceError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise EvalError(f"cannot load model {path}: {str(e).splitlines()[0][:160]}",
                        "check that it is a complete model directory or GGUF") from None


def run(vault, suite: Suite, model_ref: str, progress: Progress = lambda s, d, t: None) -> dict:
    from appliance.eval.backends import loglik, window_nll
    from appliance.quantize.quality import windows_of
    from appliance.vault import lineage
    from appliance.vault.versions import iter_records, resolve

    model_id, kind, path = resolve_model(vault, model_ref)
    datasets = {}
    for m in suite.metrics:  # every dataset is checked before any model is loaded
        if m.dataset:
            _, name, n = resolve(vault.con, m.dataset)
            datasets[m.dataset] = f"{name}@{n}"
    backend = open_backend(kind, path)
    cases, values = [], {}
    try:
        for i, c in enumerate(suite.cases):
            progress("cases", i, len(suite.cases))
            if c.expect == "choice":
                ctx = backend.render(c.prompt, c.chat)
                scores = {ch: loglik(backend, ctx, ch) for ch in c.choices}
                pick = max(scores, key=scores.get)
                cases.append({"case": c.id, "passed": pick == c.answer, "output": pick, "ttft_ms": None,
                              "total_ms": None, "tokens": 0, "scores": scores})
            else:
                r = backend.complete(c.prompt, c.chat, c.max_tokens)
                cases.append({"case": c.id, "passed": M.score(c, r["output"]), **r})
        progress("cases", len(suite.cases), len(suite.cases))
        if cases:
            values["accuracy"] = sum(c["passed"] for c in cases) / len(cases)
        if any(c["total_ms"] is not None for c in cases):
            values.update(M.latency(cases))
        for m in suite.metrics:
            ref = datasets.get(m.dataset, "")
            if m.type == "perplexity":
                texts = [r["text"] for r in iter_records(vault.con, ref, split="validation")] or \
                        [r["text"] for r in iter_records(vault.con, ref, split="train")]
                stream = []
                for t in texts:
                    stream += backend.tokenize(t) + [backend.eos]
                    if len(stream) >= m.tokens:
                        break
                import numpy as np

                wins = windows_of(np.asarray(stream[:m.tokens]), 256)
                per = window_nll(backend, wins)
                progress("perplexity", len(wins), len(wins))
                values["perplexity"] = math.exp(sum(a for a, _ in per) / max(1, sum(b for _, b in per)))
                values["perplexity_windows"] = [a / b for a, b in per]
            elif m.type == "vocab_coverage":
                texts = [r["text"] for r in iter_records(vault.con, ref)]
                values.update(M.vocab_coverage(backend.tokenize, M.domain_terms(texts)))
            elif m.type == "custom":
                values[m.name] = float(M.REGISTRY[m.name](cases))
    finally:
        backend.close()
    checks = _checks(suite, values)
    run_id = lineage.next_id(vault.con, f"eval-{suite.name}")
    summary = {"id": run_id, "suite": suite.name, "suite_path": suite.path, "model": model_id,
               "backend": backend.name, "metrics": values, "checks": checks, "ok": all(c["ok"] for c in checks),
               "cases": len(cases), "passed": sum(c["passed"] for c in cases)}
    with vault.transaction():
        vault.con.execute("INSERT INTO eval_runs VALUES (?, ?, ?, ?, ?, ?)",
                          [run_id, suite.name, model_id, backend.name, utcnow(), json.dumps(summary, default=str)])
        for c in cases:
            vault.con.execute("INSERT INTO eval_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              [run_id, c["case"], c["passed"], c["output"], c["ttft_ms"], c["total_ms"],
                               c["tokens"], json.dumps(c.get("scores")) if c.get("scores") else None])
        parents = ([(model_id, "model")] if "/" not in model_id else []) + [(d, "data") for d in datasets.values()]
        lineage.add_node(vault.con, run_id, "eval", parents,
                         attrs={k: v for k, v in summary.items() if k != "id"} | {
                             "metrics": {k: v for k, v in values.items() if k != "perplexity_windows"}})
        vault.audit("eval.run", [run_id, model_id], {"suite": suite.name, "ok": summary["ok"],
                                                      "passed": summary["passed"], "cases": summary["cases"]})
    return {**summary, "case_results": cases}


def _checks(suite: Suite, values: dict) -> list[dict]:
    out = []
    for m in suite.metrics:
        for k, limit in m.thresholds.items():
            if m.type == "latency":
                key = {"max_p95_ms": "latency_p95_ms", "max_ttft_ms": "ttft_p95_ms",
                       "min_tokens_per_s": "tokens_per_s"}[k]
                low = k.startswith("min")
            else:
                key, low = m.key, k == "min"
            v = values.get(key)
            ok = v is not None and not math.isnan(v) and (v >= limit if low else v <= limit)
            out.append({"metric": key, "limit": f"{'>=' if low else '<='} {limit}", "value": v, "ok": ok})
    return out


def load_run(con, run_id: str) -> tuple[dict, list[dict]]:
    row = con.execute("SELECT summary FROM eval_runs WHERE id = ?", [run_id]).fetchone()
    if row is None:
        raise UsageError(f"no eval run {run_id}", "list them with `appliance eval runs`")
    cases = [{"case": c, "passed": p, "output": o} for c, p, o in con.execute(
        "SELECT case_id, passed, output FROM eval_cases WHERE run = ? ORDER BY rowid", [run_id]).fetchall()]
    return json.loads(row[0]), cases


def runs(con) -> list[dict]:
    return [json.loads(s) | {"created": str(t)[:19]} for s, t in con.execute(
        "SELECT summary, created FROM eval_runs ORDER BY created, id").fetchall()]


def bootstrap_ci(deltas: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of paired differences, resampling the pairs."""
    if not deltas:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(deltas) for _ in deltas) / len(deltas) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def compare(con, a_id: str, b_id: str) -> dict:
    """Per-metric deltas B - A (paired bootstrap intervals where the samples pair up), wins and losses."""
    a, ca = load_run(con, a_id)
    b, cb = load_run(con, b_id)
    by_a = {c["case"]: c for c in ca}
    paired = [(by_a[c["case"]], c) for c in cb if c["case"] in by_a]
    out = {"a": a_id, "b": b_id, "metrics": {}, "wins": [], "losses": [], "changed": []}
    for key in sorted(set(a["metrics"]) & set(b["metrics"]) - {"perplexity_windows"}):
        va, vb = a["metrics"][key], b["metrics"][key]
        if not isinstance(va, int | float) or not isinstance(vb, int | float):
            continue
        row = {"a": va, "b": vb, "delta": vb - va, "higher_is_better": M.HIGHER_IS_BETTER.get(key)}
        if key == "accuracy" and paired:
            row["ci95"] = bootstrap_ci([float(y["passed"]) - float(x["passed"]) for x, y in paired])
        if key == "perplexity":
            wa, wb = a["metrics"].get("perplexity_windows", []), b["metrics"].get("perplexity_windows", [])
            if len(wa) == len(wb) and wa:  # same windows of the same tokens: per-window NLL pairs up
                lo, hi = bootstrap_ci([y - x for x, y in zip(wa, wb)])
                row["ci95_mean_nll"] = (lo, hi)
        out["metrics"][key] = row
    for x, y in paired:
        if y["passed"] and not x["passed"]:
            out["wins"].append(y["case"])
        elif x["passed"] and not y["passed"]:
            out["losses"].append(y["case"])
        if x["output"] != y["output"]:
            out["changed"].append(y["case"])
    return out


QUALITY = ("accuracy", "perplexity", "vocab_coverage")


def gate(con, baseline: str, candidate: str, tolerance: dict[str, float], default_tol: float) -> dict:
    """Regressions of the candidate beyond tolerance (relative, e.g. 0.02 = 2 %; accuracy in points).

    Quality metrics are always gated; timings (latency, tokens/s) only when given a tolerance of their own,
    since they measure the machine as much as the model.
    """
    cmp = compare(con, baseline, candidate)
    regressions = []
    for key, row in cmp["metrics"].items():
        better = row["higher_is_better"]
        if better is None or (key not in QUALITY and key not in tolerance):
            continue
        tol = tolerance.get(key, default_tol)
        if key == "accuracy":
            worse = row["a"] - row["b"] > tol
        else:
            scale = abs(row["a"]) or 1.0
            change = (row["a"] - row["b"]) / scale if better else (row["b"] - row["a"]) / scale
            worse = change > tol
        if worse:
            regressions.append({"metric": key, "baseline": row["a"], "candidate": row["b"], "tolerance": tol})
    return {**cmp, "regressions": regressions, "ok": not regressions}
