"""`appliance eval ab`: the model in service against its candidate, on what each actually served.

Per arm: requests, error rate, latency, answer length (tokens), refusal rate and mean feedback rating, each
with a 95 % bootstrap interval; per metric the difference candidate - model with its interval. The verdict:

- `insufficient`: an arm has fewer than `min_requests` answered requests;
- `fail`: the candidate is worse than the model beyond tolerance on the refusal rate, the error rate or the
  mean rating (when both arms have ratings), or on latency when `max_latency_increase` is given (relative);
- `pass` otherwise. Answer length is reported, never gated: longer is not better or worse by itself.
Like `eval gate`, the point difference decides; the interval says how sure it is.
"""

from __future__ import annotations

import re

import numpy as np

from appliance.errors import UsageError
from appliance.serving import store

RESAMPLES = 1000
REFUSAL = re.compile(
    r"\b(i\s*(?:am|'m)\s+(?:sorry|afraid|unable|not able)|i\s+(?:can(?:no|')t|cannot|won'?t|will not)\s+"
    r"(?:help|assist|answer|provide|do|comply|share)|as an ai\b|i\s+(?:do not|don'?t)\s+have\s+(?:access|"
    r"information)|unable to (?:help|assist|answer|provide|comply))", re.IGNORECASE)

# metric -> (direction: +1 higher is better, -1 lower is better; tolerance kind)
GATED = {"refusal_rate": -1, "error_rate": -1, "rating": +1, "latency_ms": -1}


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


def compare(con, name: str, min_requests: int = 30, tolerances: dict[str, float] | None = None,
            max_latency_increase: float | None = None) -> dict:
    """The comparison of a deployment's two arms (see the module docstring)."""
    d = store.get(con, name)
    if not d.candidate:
        raise UsageError(f"deployment {name} has no candidate to compare",
                         f"give it one: `appliance deploy create {name} --model A --candidate B --split 0.1`")
    tol = {"refusal_rate": 0.02, "error_rate": 0.02, "rating": 0.25, **(tolerances or {})}
    rows = store.served(con, name, (d.model, d.candidate))
    by = {m: samples([r for r in rows if r["model"] == m]) for m in (d.model, d.candidate)}
    counts = {m: sum(1 for r in rows if r["model"] == m) for m in (d.model, d.candidate)}
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
    short = [a for a in ("model", "candidate") if arms[a]["requests"] - _errors(arms[a]) < min_requests]
    verdict = "insufficient" if short else "fail" if regressions else "pass"
    reason = (f"fewer than {min_requests} answered requests on the {' and the '.join(short)}" if short else
              "worse on " + ", ".join(r["metric"] for r in regressions) if regressions else
              "no gated metric worse beyond tolerance")
    return {"deployment": name, "model": d.model, "candidate": d.candidate, "split": d.split, "arms": arms,
            "metrics": metrics, "regressions": regressions, "verdict": verdict, "reason": reason,
            "passed": verdict == "pass", "min_requests": min_requests, "promoted": False}


def _errors(arm: dict) -> int:
    rate = arm["error_rate"]["mean"]
    return round((rate or 0.0) * arm["requests"])
