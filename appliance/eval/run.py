"""`appliance eval run|compare|gate`: run a suite on a model, store every case, compare two runs.

A run is a lineage node `eval-SUITE@K` (parents: the model, and the datasets its metrics read) with its
summary in `eval_runs` and one row per case in `eval_cases`, all inside the vault.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from appliance import refs, sealed
from appliance.db_time import utcnow
from appliance.errors import ApplianceError, EvalError, UsageError  # EvalError: also importable from here
from appliance.eval import metrics as M
from appliance.eval.suite import Suite

Progress = Callable[[str, int, int], None]


def resolve_model(vault, ref: str) -> tuple[str, str, Path, bool]:
    """(id, backend kind, path, whether the id is a lineage node) for a model id, a GGUF id, a model
    directory or a .gguf file (a path's id is its absolute path; a sealed one of the home by its plaintext name)."""
    p = Path(ref)
    if p.suffix == ".gguf" and sealed.exists(p):
        return str(p.resolve()), "gguf", p, False
    if p.is_dir() and sealed.exists(p / "config.json"):
        return str(p.resolve()), "hf", p, False
    from appliance.vault import lineage

    ref = refs.model(vault.con, ref, gguf=True)  # NAME@K, NAME (the newest), a GGUF id, an imported one's alias
    if lineage.kind_of(vault.con, ref) == "model":
        return ref, "hf", vault.home.artifacts / "models" / ref, True
    from appliance.quantize.infer import locate

    return ref, "gguf", locate(ref, vault.home.artifacts), True


def open_backend(kind: str, path: Path):
    from appliance.eval.backends import GGUFBackend, HFBackend

    try:
        return GGUFBackend(path) if kind == "gguf" else HFBackend(path)
    except ApplianceError:
        raise
    except Exception as e:  # transformers, safetensors and llama.cpp each have their own error types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise EvalError(f"cannot load model {path}: {first}",
                        "check that it is a complete model directory or GGUF") from None


def _texts_for(records, tokens: int) -> list[str]:
    """Enough texts for a `tokens` budget: a token covers at least one character, so that many characters do."""
    out, chars = [], 0
    for r in records:
        if chars > tokens:
            break
        out.append(r["text"])
        chars += len(r["text"])
    return out


def run(vault, suite: Suite, model_ref: str, progress: Progress = lambda s, d, t: None) -> dict:

    from appliance.eval.suite import SuiteError
    from appliance.quantize.quality import token_stream
    from appliance.vault import lineage
    from appliance.vault.versions import held_out, iter_records

    model_id, kind, path, in_lineage = resolve_model(vault, model_ref)
    datasets = {}
    for m in suite.metrics:  # every dataset is checked before any model is loaded
        if m.dataset:
            try:
                datasets[m.dataset] = refs.dataset(vault.con, m.dataset)
            except UsageError as e:
                raise SuiteError(f"{suite.path}:{m.line}: {e.message}", e.hint) from None
    cases, values, inputs, texts = [], {}, {}, {}
    # What the metrics need from the vault is read now (held-out text, domain terms), so the vault is free for
    # the console and other jobs while the model loads and works through the suite.
    for m in suite.metrics:
        ref = datasets.get(m.dataset, "")
        if m.type == "perplexity":
            split, records = held_out(vault.con, ref)
            texts[m.key] = (split, _texts_for(records, m.tokens))
        elif m.type == "vocab_coverage":
            inputs[m.key] = M.domain_terms([r["text"] for r in iter_records(vault.con, ref)])
    with vault.released():
        backend = open_backend(kind, path)
        try:
            for m in suite.metrics:
                if m.key in texts:
                    split, chunk = texts[m.key]
                    inputs[m.key] = (split, token_stream(backend.tokenize, backend.eos, chunk, m.tokens))
            _work(suite, backend, datasets, inputs, cases, values, progress)
        finally:
            backend.close()
    checks = _checks(suite, values)
    run_id = lineage.next_id(vault.con, f"eval-{suite.name}")
    summary = {"id": run_id, "suite": suite.name, "suite_path": suite.path, "model": model_id,
               "backend": backend.name, "metrics": values, "checks": checks, "ok": all(c["ok"] for c in checks),
               "cases": len(cases), "passed": sum(c["passed"] for c in cases),
               # answers that are empty or whitespace only: an undertrained model's "\n\n\n" (docs/TRAINING.md)
               "blank": sum(not (c["output"] or "").strip() for c in cases if not _is_episode(c))}
    with vault.transaction():
        vault.con.execute("INSERT INTO eval_runs VALUES (?, ?, ?, ?, ?, ?)",
                          [run_id, suite.name, model_id, backend.name, utcnow(), json.dumps(summary, default=str)])
        for c in cases:
            vault.con.execute("INSERT INTO eval_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              [run_id, c["case"], c["passed"], c["output"], c["ttft_ms"], c["total_ms"],
                               c["tokens"], json.dumps(c.get("scores")) if c.get("scores") else None])
        parents = ([(model_id, "model")] if in_lineage else []) + [(d, "data") for d in sorted(set(datasets.values()))]
        lineage.add_node(vault.con, run_id, "eval", parents,
                         attrs={k: v for k, v in summary.items() if k != "id"} | {
                             "metrics": {k: v for k, v in values.items() if not isinstance(v, list | str)}})
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
            ok = isinstance(v, int | float) and not math.isnan(v) and (v >= limit if low else v <= limit)
            out.append({"metric": key, "limit": f"{'>=' if low else '<='} {limit}", "value": v, "ok": ok})
    return out


def load_run(con, run_id: str) -> tuple[dict, list[dict]]:
    run_id = refs.node(con, run_id, ("eval",), "eval run")  # NAME@K, or NAME (eval-SUITE) for the newest
    row = con.execute("SELECT summary FROM eval_runs WHERE id = ?", [run_id]).fetchone()
    if row is None:
        raise UsageError(f"no eval run {run_id}", "list them with `appliance eval runs`")
    cases = [{"case": c, "passed": p, "output": o} for c, p, o in con.execute(
        "SELECT case_id, passed, output FROM eval_cases WHERE run = ? ORDER BY rowid", [run_id]).fetchall()]
    return json.loads(row[0]), cases


def _work(suite: Suite, backend, datasets: dict, inputs: dict, cases: list, values: dict, progress: Progress) -> None:
    """The cases, then the metrics, on the model alone (no vault): fills `cases` and `values`."""
    from appliance.eval.backends import loglik, window_nll
    from appliance.quantize.quality import windows_of

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
            split, stream = inputs[m.key]
            wins = windows_of(stream, 256)
            if not wins:
                raise EvalError(f"{suite.path}:{m.line}: {ref} has too little text for perplexity",
                                "pass a dataset with held-out text")
            per = window_nll(backend, wins)
            progress("perplexity", len(wins), len(wins))
            values[m.key] = math.exp(sum(a for a, _ in per) / sum(b for _, b in per))
            values[f"{m.key}_windows"] = [a / b for a, b in per]
            values[f"{m.key}_tokens"] = hashlib.sha256(stream.tobytes()).hexdigest()
            values[f"{m.key}_split"] = split
        elif m.type == "vocab_coverage":
            cov = M.vocab_coverage(backend.tokenize, inputs[m.key])
            values[m.key] = cov["vocab_coverage"]
            values[f"{m.key}_tokens_per_term"] = cov["tokens_per_term"]
        elif m.type == "custom":
            values[m.key] = float(M.REGISTRY[m.name]([c for c in cases if not _is_episode(c)]))
        elif m.type == "task":
            _task(m, backend, cases, values, progress)


EPISODE = "task:"  # an agentic task's episode among a run's cases: "task:NAME#I"


def _is_episode(case: dict) -> bool:
    """An episode is judged by its task's success check, so accuracy intervals and custom metrics skip it."""
    return case["case"].startswith(EPISODE)


def _task(m, backend, cases: list, values: dict, progress: Progress) -> None:
    """The task's episodes, each a case `task:NAME#I` whose scores keep the transcript (every call, its
    arguments, outcome and time); the completion rate and the reasons episodes failed."""
    from collections import Counter

    from appliance import tasks

    task = tasks.load(m.task)
    indexes = task.indexes(m.split or None)
    reasons: Counter = Counter()
    done = 0
    for n, i in enumerate(indexes):
        progress(f"task {task.name}", n, len(indexes))
        t0 = time.perf_counter()
        r = tasks.run_episode(task, lambda p: backend.complete(p, True, m.max_tokens)["output"], i)
        done += r["success"]
        if r["reason"]:
            reasons[r["reason"]] += 1
        cases.append({"case": f"{EPISODE}{task.name}#{i}", "passed": r["success"], "output": r["answer"] or "",
                      "ttft_ms": None, "total_ms": round((time.perf_counter() - t0) * 1000, 1), "tokens": 0,
                      "scores": {k: r[k] for k in ("goal", "calls", "steps", "reason")}})
    progress(f"task {task.name}", len(indexes), len(indexes))
    values[m.key] = done / len(indexes)
    values[f"{m.key}_episodes"] = len(indexes)
    values[f"{m.key}_failures"] = [f"{n} x {why}" for why, n in reasons.most_common()]


def runs(con) -> list[dict]:
    return [json.loads(s) | {"created": str(t)[:19]} for s, t in con.execute(
        "SELECT summary, created FROM eval_runs ORDER BY created, id").fetchall()]


def count(con) -> int:
    """How many eval runs the vault holds."""
    return con.execute("SELECT count(*) FROM eval_runs").fetchone()[0]


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
    ma, mb = a["metrics"], b["metrics"]
    for key in sorted(set(ma) | set(mb)):
        va, vb = ma.get(key), mb.get(key)
        if isinstance(va, list | str) or isinstance(vb, list | str):
            continue
        base = key.split(":")[0]
        better = None if key.endswith("_episodes") else M.HIGHER_IS_BETTER.get(base)  # a count, not a score
        row = {"a": va, "b": vb, "higher_is_better": better,
               "delta": vb - va if isinstance(va, int | float) and isinstance(vb, int | float) else None}
        if key == "accuracy" and paired:
            row["ci95"] = bootstrap_ci([float(y["passed"]) - float(x["passed"]) for x, y in paired
                                        if not _is_episode(x)])
        if base == "perplexity" and ma.get(f"{key}_tokens") and ma.get(f"{key}_tokens") == mb.get(f"{key}_tokens"):
            # the very same tokens in the same windows: per-window NLL pairs up
            row["ci95_mean_nll"] = bootstrap_ci([y - x for x, y in zip(ma[f"{key}_windows"], mb[f"{key}_windows"])])
        out["metrics"][key] = row
    for x, y in paired:
        if y["passed"] and not x["passed"]:
            out["wins"].append(y["case"])
        elif x["passed"] and not y["passed"]:
            out["losses"].append(y["case"])
        if x["output"] != y["output"]:
            out["changed"].append(y["case"])
    return out


QUALITY = ("accuracy", "perplexity", "vocab_coverage", "task_completion")


def gate(con, baseline: str, candidate: str, tolerance: dict[str, float], default_tol: float) -> dict:
    """Regressions of the candidate beyond tolerance (relative, e.g. 0.02 = 2 %; accuracy in points).

    Quality metrics are always gated; timings (latency, tokens/s) only when given a tolerance of their own,
    since they measure the machine as much as the model.
    """
    a, _ = load_run(con, baseline)
    b, _ = load_run(con, candidate)
    if a["suite"] != b["suite"]:
        raise UsageError(f"{baseline} ran suite {a['suite']} and {candidate} ran {b['suite']}",
                         "gate two runs of the same suite")
    cmp = compare(con, baseline, candidate)
    unknown = sorted(set(tolerance) - set(cmp["metrics"]))
    if unknown:
        raise UsageError(f"--tolerance names metric(s) these runs do not have: {', '.join(unknown)}",
                         f"metrics: {', '.join(sorted(cmp['metrics']))}")
    regressions = []
    for key, row in cmp["metrics"].items():
        better = row["higher_is_better"]
        if better is None or (key.split(":")[0] not in QUALITY and key not in tolerance):
            continue
        tol = tolerance.get(key, default_tol)
        if not isinstance(row["b"], int | float) or math.isnan(row["b"]):
            regressions.append({"metric": key, "baseline": row["a"], "candidate": row["b"], "tolerance": tol})
            continue
        if not isinstance(row["a"], int | float) or math.isnan(row["a"]):
            continue  # nothing to regress from
        if key == "accuracy" or key.startswith("task_completion"):  # rates: in points
            worse = row["a"] - row["b"] > tol
        else:
            scale = abs(row["a"]) or 1.0
            change = (row["a"] - row["b"]) / scale if better else (row["b"] - row["a"]) / scale
            worse = change > tol
        if worse:
            regressions.append({"metric": key, "baseline": row["a"], "candidate": row["b"], "tolerance": tol})
    return {**cmp, "regressions": regressions, "ok": not regressions}
