"""`appliance eval ab`: the model in service against its candidate, on what each actually served.

Per arm: requests, error rate, latency, answer length (tokens), refusal rate and mean feedback rating, each
with a 95 % bootstrap interval; per metric the difference candidate - model with its interval. Where served
requests match suite cases or carry a reference answer, the suites' own metrics on the served answers too
(`scores`): `accuracy:SUITE`, `accuracy:reference` and the suites' custom metrics. The verdict:

- `insufficient`: an arm has fewer than `min_requests` answered requests;
- `fail`: the candidate is worse than the model beyond tolerance on the refusal rate, the error rate, the
  mean rating (when both arms have ratings) or a suite accuracy (points, when both arms have scored
  answers), or on latency when `max_latency_increase` is given (relative);
- `pass` otherwise. Answer length and custom metrics are reported, never gated: a custom metric has no
  known direction, and longer is not better or worse by itself.
Like `eval gate`, the point difference decides; the interval says how sure it is.
"""

from __future__ import annotations

import re

import numpy as np

from appliance.errors import UsageError
from appliance.serving import scores, store

RESAMPLES = 1000
CUSTOM_RESAMPLES = 200  # a custom metric is a Python function of a whole sample: fewer resamples of it
REFUSAL = re.compile(
    r"\b(i\s*(?:am|'m)\s+(?:sorry|afraid|unable|not able)|i\s+(?:can(?:no|')t|cannot|won'?t|will not)\s+"
    r"(?:help|assist|answer|provide|do|comply|share)|as an ai\b|i\s+(?:do not|don'?t)\s+have\s+(?:access|"
    r"information)|unable to (?:help|assist|answer|provide|comply))", re.IGNORECASE)

# metric -> (direction: +1 higher is better, -1 lower is better; tolerance kind)
GATED = {"refusal_rate": -1, "error_rate": -1, "rating": +1, "latency_ms": -1}
TOLERANCES = {"refusal_rate": 0.02, "error_rate": 0.02, "rating": 0.25, "accuracy": 0.02}


def refused(answer: str) -> bool:
    """Whether an answer reads as a refusal ("I'm sorry, I can't help with that")."""
    return bool(REFUSAL.search(answer[:400]))


def interval(values: list[float], seed: int = 0) -> list[float] | None:
    """The 95 % bootstrap interval of the mean; None for no values."""
    if not values:
        return None
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return [float(x[0]), float(x[0])]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (RESAMPLES, len(x)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def difference(a: list[float], b: list[float], seed: int = 0) -> tuple[float | None, list[float] | None]:
    """mean(b) - mean(a) and its 95 % bootstrap interval (arms resampled independently)."""
    if not a or not b:
        return None, None
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    da = xa[rng.integers(0, len(xa), (RESAMPLES, len(xa)))].mean(axis=1)
    db = xb[rng.integers(0, len(xb), (RESAMPLES, len(xb)))].mean(axis=1)
    d = db - da
    return float(xb.mean() - xa.mean()), [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]


def samples(rows: list[dict]) -> dict[str, list[float]]:
    ok = [r for r in rows if r["status"] == "ok"]
    return {"latency_ms": [float(r["latency_ms"]) for r in ok if r["latency_ms"] is not None],
            "answer_tokens": [float(r["completion_tokens"]) for r in ok if r["completion_tokens"] is not None],
            "refusal_rate": [float(refused(r["answer"])) for r in ok],
            "error_rate": [float(r["status"] != "ok") for r in rows],
            "rating": [r["rating"] for r in rows if r["rating"] is not None]}


def custom_interval(fn, cases: list[dict], seed: int = 0) -> list[float] | None:
    """The 95 % bootstrap interval of fn(cases), a metric of a whole sample."""
    if not cases:
        return None
    rng = np.random.default_rng(seed)
    vals = [fn([cases[i] for i in idx]) for idx in rng.integers(0, len(cases), (CUSTOM_RESAMPLES, len(cases)))]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def custom_difference(fn, a: list[dict], b: list[dict], seed: int = 0) -> tuple[float | None, list[float] | None]:
    """fn(b) - fn(a) and its 95 % bootstrap interval (arms resampled independently)."""
    if not a or not b:
        return None, None
    rng = np.random.default_rng(seed)
    d = [fn([b[i] for i in ib]) - fn([a[i] for i in ia])
         for ia, ib in zip(rng.integers(0, len(a), (CUSTOM_RESAMPLES, len(a))),
                           rng.integers(0, len(b), (CUSTOM_RESAMPLES, len(b))))]
    return float(fn(b) - fn(a)), [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]


def compare(con, name: str, min_requests: int = 30, tolerances: dict[str, float] | None = None,
            max_latency_increase: float | None = None, suites: list | None = None) -> dict:
    """The comparison of a deployment's two arms (see the module docstring); `suites` as `scores.suites`
    gives them (None: every shipped suite)."""
    d = store.get(con, name)
    if not d.candidate:
        raise UsageError(f"deployment {name} has no candidate to compare",
                         f"give it one: `appliance deploy create {name} --model A --candidate B --split 0.1`")
    tol = {**TOLERANCES, **(tolerances or {})}
    rows = store.served(con, name, (d.model, d.candidate))
    chosen = scores.suites() if suites is None else suites
    by, sc, counts = {}, {}, {}
    for m in (d.model, d.candidate):
        mine = [r for r in rows if r["model"] == m]
        by[m], sc[m], counts[m] = samples(mine), scores.scored(mine, chosen), len(mine)
    arms = {}
    for arm, m in (("model", d.model), ("candidate", d.candidate)):
        s = by[m]
        arms[arm] = {"id": m, "requests": counts[m], "ratings": len(s["rating"]),
                     **{k: {"mean": float(np.mean(v)) if v else None, "ci95": interval(v)} for k, v in s.items()}}
    metrics, regressions = {}, []
    for k in ("latency_ms", "answer_tokens", "refusal_rate", "error_rate", "rating"):
        delta, ci = difference(by[d.model][k], by[d.candidate][k])
        base = arms["model"][k]["mean"]
        gated = k in GATED and delta is not None and (k != "latency_ms" or max_latency_increase is not None)
        limit = None
        if gated:
            limit = max_latency_increase * abs(base or 0.0) if k == "latency_ms" else tol[k]
            if GATED[k] * delta < -limit - 1e-12:
                regressions.append({"metric": k, "model": base, "candidate": arms["candidate"][k]["mean"],
                                    "delta": delta, "tolerance": limit})
        metrics[k] = {"model": base, "candidate": arms["candidate"][k]["mean"], "delta": delta, "ci95": ci,
                      "gated": gated, "tolerance": limit}
    _suite_metrics(arms, metrics, regressions, sc[d.model], sc[d.candidate], chosen, tol)
    short = [a for a in ("model", "candidate") if arms[a]["requests"] - _errors(arms[a]) < min_requests]
    verdict = "insufficient" if short else "fail" if regressions else "pass"
    reason = (f"fewer than {min_requests} answered requests on the {' and the '.join(short)}" if short else
              "worse on " + ", ".join(r["metric"] for r in regressions) if regressions else
              "no gated metric worse beyond tolerance")
    return {"deployment": name, "model": d.model, "candidate": d.candidate, "split": d.split, "arms": arms,
            "metrics": metrics, "regressions": regressions, "verdict": verdict, "reason": reason,
            "passed": verdict == "pass", "min_requests": min_requests, "promoted": False,
            "suites": [s.name for s in chosen]}


def _suite_metrics(arms: dict, metrics: dict, regressions: list, a: dict, b: dict, chosen: list,
                   tol: dict) -> None:
    """The suite metrics on the served answers (`scores`) into `arms` and `metrics`: accuracies gated in points
    when both arms have scored answers, custom metrics reported."""
    for arm, sc in (("model", a), ("candidate", b)):
        arms[arm]["scored"] = {k: len(v) for k, v in sorted(sc.items())}
    for k in sorted(set(a) | set(b)):
        va, vb = [float(c["passed"]) for c in a.get(k, [])], [float(c["passed"]) for c in b.get(k, [])]
        ma, mb = (float(np.mean(va)) if va else None), (float(np.mean(vb)) if vb else None)
        arms["model"][k], arms["candidate"][k] = {"mean": ma, "ci95": interval(va)}, {"mean": mb, "ci95": interval(vb)}
        delta, ci = difference(va, vb)
        limit = tol.get(k, tol["accuracy"]) if delta is not None else None
        if delta is not None and delta < -limit - 1e-12:
            regressions.append({"metric": k, "model": ma, "candidate": mb, "delta": delta, "tolerance": limit})
        metrics[k] = {"model": ma, "candidate": mb, "delta": delta, "ci95": ci, "gated": delta is not None,
                      "tolerance": limit}
    for k, (source, fn) in scores.measures(chosen).items():
        ca, cb = a.get(source, []), b.get(source, [])
        if not ca and not cb:
            continue
        ma, mb = (float(fn(ca)) if ca else None), (float(fn(cb)) if cb else None)
        arms["model"][k] = {"mean": ma, "ci95": custom_interval(fn, ca)}
        arms["candidate"][k] = {"mean": mb, "ci95": custom_interval(fn, cb)}
        delta, ci = custom_difference(fn, ca, cb)
        metrics[k] = {"model": ma, "candidate": mb, "delta": delta, "ci95": ci, "gated": False, "tolerance": None}


def _errors(arm: dict) -> int:
    rate = arm["error_rate"]["mean"]
    return round((rate or 0.0) * arm["requests"])
