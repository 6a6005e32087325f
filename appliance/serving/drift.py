"""`appliance eval drift --deployment D --window 7d`: what a deployment served lately against the window before.

Inputs: the mean length of the users' messages (relative change), the Jensen-Shannon divergence of the
word distributions of the two windows (base 2: 0 the same, 1 nothing shared), and the unseen-vocabulary
rate (the share of recent words never seen in the earlier window). Outputs: the refusal rate and the error
rate (absolute change). Drift is any of them past its limit; with fewer than `min_records` in a window
nothing is judged (`enough` false) and the check passes. All of it is computed from the scrubbed records
in the vault.

Outputs on replayed probes: a deployment has a fixed probe set (`deploy create --probes DATASET@N`, else
drawn at its first check from the dataset nearest its model in the lineage; none when its model has no
lineage). Each check replays it on the deployment's model and candidate (`appliance.eval.drift`, the one
implementation of replayed probes) and keeps the answers, so outputs are compared over time and across the
model versions the deployment has served: `answer_change` (the share of probes answered differently) and
`probe_kl` (mean KL of the next-token distributions) of the model in service now against the replay that
was the latest when the earlier window ended (else the first). Those two are judged whatever the record
counts; the candidate's are reported, not judged (it is meant to differ).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import datetime, timedelta

from appliance.db_time import iso, utcnow
from appliance.errors import UsageError
from appliance.serving import store
from appliance.serving.ab import refused

WORD = re.compile(r"\[[A-Z_0-9]+\]|\w+", re.UNICODE)
UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DEFAULT_LIMITS = {"js_divergence": 0.2, "unseen_rate": 0.2, "length_change": 0.5, "refusal_change": 0.1,
                  "error_change": 0.05, "answer_change": 0.2, "probe_kl": 0.05}
PROBED = ("answer_change", "probe_kl")  # judged on replayed probes, whatever the records
PROBES = 20  # probes in a deployment's set
KEEP_REPLAYS = 60  # replays kept per deployment (and the first of every model version)


def parse_window(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `2w` as a timedelta."""
    m = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text or "")
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"--window {text!r} is not a length of time", "write NUMBER and m, h, d or w: 7d, 12h, 2w")
    return timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])


def words(rows: list[dict]) -> Counter:
    c: Counter = Counter()
    for r in rows:
        for m in r["messages"]:
            if m.get("role") in store.ASKED:
                c.update(w.lower() for w in WORD.findall(m.get("content") or ""))
    return c


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence (base 2) of two word counts: 0 for the same distribution, 1 for disjoint."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ or not nq:
        return 0.0
    total = 0.0
    for w in set(p) | set(q):
        a, b = p.get(w, 0) / np_, q.get(w, 0) / nq
        m = (a + b) / 2
        if a:
            total += 0.5 * a * math.log2(a / m)
        if b:
            total += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, total))


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    n = len(rows)
    return {"records": n, "mean_input_chars": (sum(r["input_chars"] or 0 for r in rows) / n) if n else None,
            "refusal_rate": (sum(refused(r["answer"]) for r in ok) / len(ok)) if ok else None,
            "error_rate": (sum(r["status"] != "ok" for r in rows) / n) if n else None}


def check(con, name: str, window: timedelta, limits: dict[str, float] | None = None, min_records: int = 20,
          now: datetime | None = None, replayed: dict | None = None) -> dict:
    """The served drift of deployment `name`; `replayed` is `replay`'s comparison, when probes were replayed."""
    store.get(con, name)
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    end = now or utcnow()
    start, base_start = end - window, end - 2 * window
    recent = store.served(con, name, since=start, until=end)
    base = store.served(con, name, since=base_start, until=start)
    r, b = summary(recent), summary(base)
    wr, wb = words(recent), words(base)
    enough = r["records"] >= min_records and b["records"] >= min_records
    unseen = sum(n for w, n in wr.items() if w not in wb) / max(1, sum(wr.values())) if wb else None
    values = {
        "js_divergence": js_divergence(wb, wr) if wb and wr else None,
        "unseen_rate": unseen,
        "length_change": (r["mean_input_chars"] - b["mean_input_chars"]) / b["mean_input_chars"]
        if r["mean_input_chars"] is not None and b["mean_input_chars"] else None,
        "refusal_change": (r["refusal_rate"] - b["refusal_rate"])
        if r["refusal_rate"] is not None and b["refusal_rate"] is not None else None,
        "error_change": (r["error_rate"] - b["error_rate"]) if r["error_rate"] is not None and b["error_rate"]
        is not None else None,
        "answer_change": (replayed or {}).get("answer_change"),
        "probe_kl": (replayed or {}).get("probe_kl"),
    }
    drifted = [k for k, v in values.items() if (enough or k in PROBED) and v is not None and abs(v) > lim[k]]
    return {"deployment": name, "window": {"start": iso(start), "end": iso(end)},
            "baseline_window": {"start": iso(base_start), "end": iso(start)}, "recent": r, "earlier": b,
            "metrics": values, "limits": lim, "drifted": drifted, "enough": enough, "min_records": min_records,
            "recorded": False, "ok": not drifted,
            "replay": replayed or {"measured": False, "reason": "probes not replayed"}}


# --- outputs on replayed probes -----------------------------------------------------------------------------
def probe_key(name: str) -> str:
    from appliance.eval.drift import DEPLOYMENT_PREFIX

    return DEPLOYMENT_PREFIX + name


def probe_set(con, name: str) -> dict | None:
    """Deployment `name`'s probe set: its dataset, prompts and replays so far (oldest first); None if none."""
    row = con.execute("SELECT dataset, probes, snapshot, created FROM eval_drift WHERE name = ?",
                      [probe_key(name)]).fetchone()
    if row is None:
        return None
    return {"dataset": row[0], "probes": json.loads(row[1]), "replays": json.loads(row[2]), "created": iso(row[3])}


def set_probes(vault, name: str, dataset: str, n: int = PROBES) -> dict:
    """Fix deployment `name`'s probe set: `n` probes drawn from `dataset` (audited). The same dataset and
    count keep the set and its replays; another starts them afresh."""
    from appliance import refs
    from appliance.eval.drift import probes

    con = vault.con
    d = store.get(con, name)
    dataset = refs.dataset(con, dataset)
    old = probe_set(con, name)
    if old is not None and old["dataset"] == dataset and len(old["probes"]) == n:
        return _described(old)
    prompts = probes(con, dataset, n)
    with vault.transaction():
        _put(con, name, d.model, dataset, prompts, [])
        vault.audit("deploy.probes", [name, dataset], {"probes": len(prompts)})
    return _described(probe_set(con, name))


def _put(con, name: str, model: str, dataset: str, prompts: list[str], replays: list[dict]) -> None:
    con.execute("DELETE FROM eval_drift WHERE name = ?", [probe_key(name)])
    con.execute("INSERT INTO eval_drift VALUES (?, ?, ?, ?, ?, ?)",
                [probe_key(name), model, dataset, json.dumps(prompts), json.dumps(replays), utcnow()])


def _described(ps: dict | None) -> dict | None:
    """A probe set as `deploy show` and `deploy create` report it (no probe text)."""
    if ps is None:
        return None
    last = ps["replays"][-1] if ps["replays"] else None
    return {"dataset": ps["dataset"], "probes": len(ps["probes"]), "replays": len(ps["replays"]),
            "models": sorted({r["model"] for r in ps["replays"]}), "last": last["at"] if last else None}


def described(con, name: str) -> dict | None:
    return _described(probe_set(con, name))


def _auto_dataset(con, model: str) -> str | None:
    """The dataset nearest the model in the lineage, or None (a model served from a path has no lineage)."""
    from appliance.vault import lineage

    if lineage.find(con, model) is None:
        return None
    return lineage.nearest_dataset(con, model)


def replay(vault, name: str, window: timedelta, now: datetime | None = None) -> dict:
    """Replay deployment `name`'s probe set on its model and candidate, keep the answers (unless the vault is
    read-only) and compare the model's with the baseline replay (see the module docstring)."""
    from appliance.eval import drift as probes_
    from appliance.eval.run import open_backend
    from appliance.quantize.infer import locate

    con, end = vault.con, now or utcnow()
    d = store.get(con, name)
    ps = probe_set(con, name)
    if ps is None:
        dataset = _auto_dataset(con, d.model)
        if dataset is None:
            return {"measured": False, "reason": f"no probe set: {d.model} has no dataset in its lineage; give "
                                                 f"one with `appliance deploy create {name} ... --probes DATASET@N`"}
        ps = {"dataset": dataset, "probes": probes_.probes(con, dataset, PROBES), "replays": []}
    arms = [("model", d.model)] + ([("candidate", d.candidate)] if d.candidate else [])
    backends = {}
    try:  # loaded while the vault is attached (its keys open sealed files), run while it is free for others
        for arm, m in arms:
            backends[arm] = open_backend("gguf", locate(m, vault.home.artifacts))
        with vault.released():
            fresh = {arm: probes_.snapshot(backends[arm], ps["probes"]) for arm, _ in arms}
    finally:
        for backend in backends.values():
            backend.close()
    at = iso(end)
    mine = [r for r in ps["replays"] if r["arm"] == "model"]
    cutoff = iso(end - window)
    older = [r for r in mine if r["at"] <= cutoff]
    base = older[-1] if older else (mine[0] if mine else None)
    res = {"measured": base is not None, "dataset": ps["dataset"], "probes": len(ps["probes"]), "at": at,
           "model": d.model, "baseline": {"at": base["at"], "model": base["model"]} if base else None}
    if base is None:
        res["reason"] = "the first replay: the baseline of later checks"
    else:
        c = probes_.changes(base["answers"], fresh["model"])
        res.update(answer_change=c["answer_change_rate"], probe_kl=c["mean_kl"], changed_probes=c["changed_probes"])
        if "candidate" in fresh:
            cc = probes_.changes(base["answers"], fresh["candidate"])
            res["candidate"] = {"model": d.candidate, "answer_change": cc["answer_change_rate"],
                                "probe_kl": cc["mean_kl"]}
    now_answers = [s["answer"] for s in fresh["model"]]
    res["history"] = [{"at": r["at"], "model": r["model"], "arm": r["arm"],
                       "answer_change": sum(a["answer"] != b for a, b in zip(r["answers"], now_answers))
                       / max(1, len(now_answers))} for r in ps["replays"]]
    if not vault.read_only:
        replays = ps["replays"] + [{"at": at, "model": m, "arm": arm, "answers": probes_.kept(fresh[arm])}
                                   for arm, m in arms]
        with vault.transaction():  # vault.con: the connection of before the models ran is closed
            _put(vault.con, name, d.model, ps["dataset"], ps["probes"], _trim(replays))
    return res


def _trim(replays: list[dict]) -> list[dict]:
    """The newest KEEP_REPLAYS, and the first replay of every model version."""
    firsts = {}
    for i, r in enumerate(replays):
        firsts.setdefault(r["model"], i)
    keep = set(firsts.values()) | set(range(max(0, len(replays) - KEEP_REPLAYS), len(replays)))
    return [r for i, r in enumerate(replays) if i in keep]
