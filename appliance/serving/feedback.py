"""Feedback on served responses, and the dataset version made from it.

A rating (1 worst .. 5 best) and/or a corrected answer, on a recorded response. `export` turns a
deployment's corrections into one table in a new dataset version, through the one version builder:
`instruction` (the conversation's last user message, scrubbed), `response` (the correction: SFT rows),
`chosen` (the correction) and `rejected` (the answer served: DPO rows), with the model that served it and
the rating. Each export holds every correction of the deployment so far (a new version of the dataset, not
an addition to the previous one). Its lineage parents are the models that served those answers; the
deployment is in its attributes.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from appliance.db_time import utcnow
from appliance.errors import UsageError
from appliance.serving import store

COLUMNS = ("instruction", "response", "chosen", "rejected", "model", "rating", "record")


def add(vault, record_id: str, rating: int | None, correction: str | None, scrub) -> dict:
    """Feedback on `record_id` (scrubbed with `scrub`), audited with the id only."""
    store.check_record_id(record_id)
    if rating is None and not correction:
        raise UsageError("give --rating, --correction or both", "e.g. --rating 2 --correction 'The valve ...'")
    if rating is not None and not 1 <= rating <= 5:
        raise UsageError(f"--rating {rating} must be from 1 (worst) to 5 (best)", "e.g. --rating 4")
    if not store.record_exists(vault.con, record_id):
        raise UsageError(f"no serving record {record_id}", "list them with `appliance deploy records DEPLOYMENT`")
    text = scrub(correction)[0] if correction else None
    from appliance.vault.audit import actor_of

    with vault.transaction() as con:
        store.insert_feedback(con, [store.Feedback(record_id, utcnow(), rating, text, actor_of(vault))])
        vault.audit("serve.feedback", [record_id], {"rating": rating, "correction": bool(text)})
    return {"id": record_id, "rating": rating, "correction": bool(text), "recorded": True}


def _prompt(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") in store.ASKED]
    return users[-1] if users else ""


def export(vault, deployment: str, dataset: str, validation: float = 0.05) -> dict:
    """A dataset version of the deployment's corrections (see the module docstring)."""
    import pyarrow as pa

    from appliance.vault import lineage
    from appliance.vault.builder import VersionBuilder
    from appliance.vault.readers import Record
    from appliance.vault.readers.tables import render_row

    con = vault.con
    d = store.get(con, deployment)
    rows = [{"instruction": _prompt(c["messages"]), "response": c["correction"], "chosen": c["correction"],
             "rejected": c["answer"], "model": c["model"], "rating": c["rating"], "record": c["id"]}
            for c in store.corrections(con, deployment)]
    rows = [r for r in rows if r["instruction"].strip() and r["chosen"].strip() != r["rejected"].strip()]
    if not rows:
        raise UsageError(f"deployment {deployment} has no corrections to export",
                         "send corrections with POST /v1/feedback or `appliance feedback ID --correction TEXT`")
    models = sorted({r["model"] for r in rows})
    parents = [(m, "model") for m in models if lineage.find(con, m) is not None]
    src = f"serving:{deployment}"
    with VersionBuilder(vault, dataset, pii_mode="redact", validation_fraction=validation,
                        atomic=True) as b:
        target = b.table_name("feedback")
        b.create_table(target, pa.Table.from_pylist(rows, schema=pa.schema(
            [(c, pa.int64() if c == "rating" else pa.string()) for c in COLUMNS])))
        nbytes = 0
        for i, row in enumerate(rows, 1):
            text = render_row("feedback", i, row, list(COLUMNS))
            data = text.encode("utf-8")
            nbytes += len(data)
            b.add(Record(kind="table", source=src, text=text, path=target, title="feedback",
                         meta={"row": i, "deployment": deployment}, scrubbed=True), text,
                  hashlib.sha256(data).hexdigest(), len(data))
        b.source(src, "table", nbytes, None, len(rows), 0, "ok")
        b.pii(src, Counter())
        b.table(target, src)
        done = b.commit("feedback.export", parents=parents,
                        attrs={"files": 0, "deployment": deployment, "models": models, "served_model": d.model},
                        details={"deployment": deployment, "new_records": len(rows)})
    return {"version": done.version, "deployment": deployment, "rows": len(rows), "table": f"data.{target}",
            "models": models, "parents": [p for p, _ in parents]}
