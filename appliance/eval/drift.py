"""`appliance eval drift`: re-run a fixed probe set and compare with the stored baseline.

The probes are prefixes of held-out records of a dataset (the model's own by default), fixed when the
baseline is recorded. For each probe the baseline keeps the greedy answer and the next-token
distribution (its top 50 tokens and the mass of the rest). A later check measures the answer change rate
and the KL divergence (baseline || now) of those distributions, and fails past the thresholds. Probes,
answers and distributions stay in the vault.

The pieces (`probe_dataset`, `probes`, `replay`, `kept`, `changes`) are the one implementation of replayed
probes: `appliance.serving.drift` replays a deployment's probe set with them (`eval drift --deployment`),
keeping its rows under `deployment:NAME`, a name a model baseline cannot take.
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


DEPLOYMENT_PREFIX = "deployment:"  # eval_drift rows of deployments' probe sets (appliance.serving.drift)


def probe_dataset(con, model_id: str, in_lineage: bool, dataset: str | None = None) -> str:
    """The dataset probes are drawn from: `dataset` if given, else the nearest in the model's lineage."""
    from appliance import refs
    from appliance.vault.lineage import nearest_dataset

    if dataset:
        return refs.dataset(con, dataset)
    found = nearest_dataset(con, model_id) if in_lineage else None
    if not found:
        raise UsageError(f"{model_id} has no dataset in its lineage to draw probes from", "pass --dataset NAME@N")
    return found


def replay(kind: str, path, prompts: list[str]) -> list[dict]:
    """A snapshot of the model at `path` on `prompts` (the model is loaded for it and let go after)."""
    from appliance.eval.run import open_backend

    backend = open_backend(kind, path)
    try:
        return snapshot(backend, prompts)
    finally:
        backend.close()


def kept(snap: list[dict]) -> list[dict]:
    """What the vault keeps of a snapshot: each probe's answer and top tokens (not the whole distribution)."""
    return [{"answer": s["answer"], "top": s["top"]} for s in snap]


def changes(base: list[dict], now: list[dict]) -> dict:
    """How a fresh snapshot `now` differs from a kept one `base`: the share of probes whose greedy answer
    changed (and which), and the mean and largest KL(base || now) of the next-token distributions."""
    changed = [i for i, (b, n) in enumerate(zip(base, now)) if b["answer"] != n["answer"]]
    kls = [kl({int(k): v for k, v in b["top"].items()}, n["dist"]) for b, n in zip(base, now)]
    return {"answer_change_rate": len(changed) / len(base), "changed_probes": changed,
            "mean_kl": sum(kls) / len(kls), "max_kl": max(kls)}


def check(vault, model_ref: str, dataset: str | None, name: str | None, max_change: float, max_kl: float,
          probes_n: int = 20, rebaseline: bool = False) -> dict:
    from appliance.eval.run import resolve_model

    model_id, kind, path, in_lineage = resolve_model(vault, model_ref)
    key = name or model_id
    if key.startswith(DEPLOYMENT_PREFIX):
        raise UsageError(f"baseline name {key} is a deployment's probe set",
                         "check a deployment with `appliance eval drift --deployment NAME`; name this baseline "
                         "otherwise")
    con = vault.con
    row = con.execute("SELECT model, dataset, probes, snapshot FROM eval_drift WHERE name = ?", [key]).fetchone()
    if row is None or rebaseline:
        dataset = probe_dataset(con, model_id, in_lineage, dataset)
        prompts = probes(con, dataset, probes_n)
        stored = kept(replay(kind, path, prompts))
        with vault.transaction():
            con.execute("DELETE FROM eval_drift WHERE name = ?", [key])
            con.execute("INSERT INTO eval_drift VALUES (?, ?, ?, ?, ?, ?)",
                        [key, model_id, dataset, json.dumps(prompts), json.dumps(stored), utcnow()])
            vault.audit("eval.drift.baseline", [key, model_id], {"dataset": dataset, "probes": len(prompts)})
        return {"baseline": key, "model": model_id, "dataset": dataset, "probes": len(prompts), "recorded": True,
                "ok": True}
    base_model, dataset, prompts, stored = row[0], row[1], json.loads(row[2]), json.loads(row[3])
    res = {"baseline": key, "baseline_model": base_model, "model": model_id, "dataset": dataset,
           "probes": len(prompts), "recorded": False, **changes(stored, replay(kind, path, prompts)),
           "max_change": max_change, "max_kl_allowed": max_kl}
    res["ok"] = res["answer_change_rate"] <= max_change and res["mean_kl"] <= max_kl and not math.isnan(res["mean_kl"])
    with vault.transaction():
        vault.audit("eval.drift", [key, model_id], {k: res[k] for k in ("answer_change_rate", "mean_kl", "ok")})
    return res
