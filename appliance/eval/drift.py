"""`appliance eval drift`: re-run a fixed probe set and compare with the stored baseline.

The probes are prefixes of held-out records of a dataset (the model's own by default), fixed when the
baseline is recorded. For each probe the baseline keeps the greedy answer and the next-token
distribution (its top 50 tokens and the mass of the rest). A later check measures the answer change rate
and the KL divergence (baseline || now) of those distributions, and fails past the thresholds. Probes,
answers and distributions stay in the vault.
"""

from __future__ import annotations

import json
import math

import numpy as np

from appliance.db_time import utcnow
from appliance.errors import UsageError

TOP = 50
PROBE_CHARS = 160


def probes(con, dataset: str, n: int) -> list[str]:
    from appliance.vault.versions import iter_records

    out: list[str] = []
    for split in ("validation", "train"):
        for rec in iter_records(con, dataset, split=split):
            text = " ".join(rec["text"].split())
            if len(text) >= 40:
                out.append(text[:PROBE_CHARS].rsplit(" ", 1)[0])
            if len(out) >= n:
                return out
    if not out:
        raise UsageError(f"{dataset} has no text to probe with", "pass --dataset with text records")
    return out


def snapshot(backend, prompts: list[str], max_tokens: int = 16) -> list[dict]:
    out = []
    for p in prompts:
        logits = backend.logits(backend.tokenize(p))[-1]
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        top = np.argsort(-prob)[:TOP]
        out.append({"answer": backend.complete(p, False, max_tokens)["output"],
                    "top": {int(i): float(prob[i]) for i in top}, "dist": prob})
    return out


def kl(base_top: dict, now: np.ndarray) -> float:
    """KL(baseline || now) over the baseline's top tokens plus one bucket for everything else."""
    ids = [int(i) for i in base_top]
    p = np.array([base_top[i] for i in base_top] + [max(0.0, 1.0 - sum(base_top.values()))])
    q = np.array([now[i] for i in ids] + [max(0.0, 1.0 - float(now[ids].sum()))])
    eps = 1e-12
    return max(0.0, float(np.sum(p * (np.log(p + eps) - np.log(q + eps)))))  # >= 0 up to rounding


def check(vault, model_ref: str, dataset: str | None, name: str | None, max_change: float, max_kl: float,
          probes_n: int = 20, rebaseline: bool = False) -> dict:
    from appliance import refs
    from appliance.eval.run import open_backend, resolve_model
    from appliance.vault.lineage import nearest_dataset

    model_id, kind, path, in_lineage = resolve_model(vault, model_ref)
    key = name or model_id
    con = vault.con
    row = con.execute("SELECT model, dataset, probes, snapshot FROM eval_drift WHERE name = ?", [key]).fetchone()
    if row is None or rebaseline:
        if dataset:
            dataset = refs.dataset(con, dataset)
        else:
            dataset = nearest_dataset(con, model_id) if in_lineage else None
        if not dataset:
            raise UsageError(f"{model_id} has no dataset in its lineage to draw probes from",
                             "pass --dataset NAME@N")
        prompts = probes(con, dataset, probes_n)
        backend = open_backend(kind, path)
        try:
            snap = snapshot(backend, prompts)
        finally:
            backend.close()
        stored = [{"answer": s["answer"], "top": s["top"]} for s in snap]
        with vault.transaction():
            con.execute("DELETE FROM eval_drift WHERE name = ?", [key])
            con.execute("INSERT INTO eval_drift VALUES (?, ?, ?, ?, ?, ?)",
                        [key, model_id, dataset, json.dumps(prompts), json.dumps(stored), utcnow()])
            vault.audit("eval.drift.baseline", [key, model_id], {"dataset": dataset, "probes": len(prompts)})
        return {"baseline": key, "model": model_id, "dataset": dataset, "probes": len(prompts), "recorded": True,
                "ok": True}
    base_model, dataset, prompts, stored = row[0], row[1], json.loads(row[2]), json.loads(row[3])
    backend = open_backend(kind, path)
    try:
        now = snapshot(backend, prompts)
    finally:
        backend.close()
    changed = [i for i, (b, n) in enumerate(zip(stored, now)) if b["answer"] != n["answer"]]
    kls = [kl({int(k): v for k, v in b["top"].items()}, n["dist"]) for b, n in zip(stored, now)]
    res = {"baseline": key, "baseline_model": base_model, "model": model_id, "dataset": dataset,
           "probes": len(prompts), "recorded": False, "answer_change_rate": len(changed) / len(prompts),
           "changed_probes": changed, "mean_kl": sum(kls) / len(kls), "max_kl": max(kls),
           "max_change": max_change, "max_kl_allowed": max_kl}
    res["ok"] = res["answer_change_rate"] <= max_change and res["mean_kl"] <= max_kl and not math.isnan(res["mean_kl"])
    with vault.transaction():
        vault.audit("eval.drift", [key, model_id], {k: res[k] for k in ("answer_change_rate", "mean_kl", "ok")})
    return res
