"""`appliance deploy ...` and `appliance feedback ...`: thin over `appliance.api` (deployments)."""

from __future__ import annotations

import click

from appliance import api
from appliance.api.format import num
from appliance.cli.app import Ctx, OnceGroup, cli, command
from appliance.cli.output import out, table


@cli.group("deploy")
def deploy_group():
    """Deployments: what `appliance serve --deployment NAME` serves, what it records, and its records."""


def _describe(d: dict) -> str:
    arms = d["model"] + (f"  +  {d['candidate']} on {d['split']:.0%} of conversations" if d.get("candidate") else "")
    rec = (f"recording {d['sample_rate']:.0%} of requests, kept {d['retention_days']} days" if d["record"]
           else "not recording")
    verdict = f"; last A/B verdict: {d['verdict']['verdict']}" if d.get("verdict") else ""
    return f"{d['name']}: {arms}; {rec}{verdict}"


@command(deploy_group, "create")
@click.argument("name")
@click.option("--model", required=True, help="The model in service: a GGUF id (NAME@K:TYPE) or a .gguf path.")
@click.option("--candidate", default=None, help="A model on trial, answering a share of conversations.")
@click.option("--split", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="The share of conversations the candidate answers.")
@click.option("--record/--no-record", default=False, show_default=True,
              help="Keep each request and response, PII-scrubbed, in the vault.")
@click.option("--sample-rate", type=click.FloatRange(0, 1), default=None,
              help="The share of requests recorded (default: as it was, else 1).")
@click.option("--retention-days", type=click.IntRange(1), default=None,
              help="Records older than this are deleted (default: as it was, else 30).")
@click.option("--probes", default=None, metavar="DATASET@N",
              help="Fix the probes `eval drift --deployment` replays on the models from this dataset (default: "
                   "the dataset nearest the model in its lineage, at the first check).")
@click.option("--probe-count", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="With --probes: how many probes.")
def deploy_create_cmd(c: Ctx, name, model, candidate, split, record, sample_rate, retention_days, probes,
                      probe_count):
    """Create or change deployment NAME (audited)."""
    api.deploy_spec(name, model, candidate, split, record, 1.0 if sample_rate is None else sample_rate,
                    30 if retention_days is None else retention_days)  # before the passphrase
    with c.open_vault() as v:
        r = api.deploy_create(v, name, model, candidate, split, record, sample_rate, retention_days, probes,
                              probe_count)
    c.emit(r, _describe(r["deployment"]) + _probes(r["probes"]))


def _probes(p: dict | None) -> str:
    if not p:
        return ""
    last = f", last {p['last']}" if p["last"] else ""
    return f"\nprobes: {p['probes']} from {p['dataset']}, replayed {p['replays']} times{last}"


@command(deploy_group, "list")
def deploy_list_cmd(c: Ctx):
    """Every deployment, its arms, recording and last A/B verdict."""
    with c.open_vault(read_only=True) as v:
        r = api.deploy_list(v)
    rows = [[d["name"], d["model"], d.get("candidate") or "-", f"{d['split']:.0%}" if d.get("candidate") else "-",
             "yes" if d["record"] else "no", d["records"], d["feedback"],
             d["verdict"]["verdict"] if d.get("verdict") else "-"] for d in r["deployments"]]
    cols = ["deployment", "model", "candidate", "split", "record", "records", "feedback", "A/B"]
    c.emit(r, lambda: table(cols, rows) if rows else
           out.print("no deployments yet: `appliance deploy create NAME --model ID`"))


@command(deploy_group, "show")
@click.argument("name")
def deploy_show_cmd(c: Ctx, name):
    """One deployment and how much it has recorded."""
    with c.open_vault(read_only=True) as v:
        r = api.deploy_show(v, name)
    c.emit(r, f"{_describe(r['deployment'])}\n{r['records']} records ({r['first'] or '-'} .. {r['last'] or '-'}), "
              f"{r['feedback']} feedback{_probes(r['probes'])}")


@command(deploy_group, "records")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--text", is_flag=True, help="Include the scrubbed messages and answers.")
def deploy_records_cmd(c: Ctx, name, limit, offset, text):
    """A deployment's serving records, newest first: ids (for feedback and erasure), arm, model, timings."""
    with c.open_vault(read_only=True) as v:
        r = api.deploy_records(v, name, limit, offset, text)

    def human():
        table(["id", "arm", "model", "created", "tokens", "ms", "status", "feedback"],
              [[x["id"], x["arm"], x["model"], x["created"], x["completion_tokens"], num(x["latency_ms"]), x["status"],
                x["feedback"]] for x in r["records"]])
        if text:
            for x in r["records"]:
                out.print(f"{x['id']}: {x['messages'][-1]['content'] if x['messages'] else ''} -> {x['answer']}",
                          markup=False)
        out.print(f"{len(r['records'])} of {r['total']} records")

    c.emit(r, human)


@command(deploy_group, "delete-record")
@click.argument("record_id", metavar="ID")
def deploy_delete_record_cmd(c: Ctx, record_id):
    """Erase serving record ID and its feedback (a person's right to erasure); the deletion is audited."""
    with c.open_vault() as v:
        r = api.deploy_delete_record(v, record_id)
    c.emit(r, f"deleted {r['id']} from {r['deployment']} ({r['feedback_deleted']} feedback)")


class FeedbackGroup(OnceGroup):
    """`appliance feedback ID ...` is `appliance feedback add ID ...`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["add", *args]
        return super().resolve_command(ctx, args)


@cli.group("feedback", cls=FeedbackGroup)
def feedback_group():
    """Ratings and corrections of served responses, and the datasets made from them.

    `appliance feedback ID --rating N [--correction TEXT]` is short for `appliance feedback add ID ...`.
    """


@command(feedback_group, "add")
@click.argument("record_id", metavar="ID")
@click.option("--rating", type=click.IntRange(1, 5), default=None, help="1 (worst) to 5 (best).")
@click.option("--correction", default=None, help="The answer the model should have given (PII-scrubbed).")
def feedback_add_cmd(c: Ctx, record_id, rating, correction):
    """Record a rating and/or a corrected answer for served response ID."""
    with c.open_vault() as v:
        r = api.feedback_add(v, record_id, rating, correction)
    c.emit(r, f"feedback recorded for {r['id']}")


@command(feedback_group, "export")
@click.argument("deployment")
@click.option("--name", "dataset", required=True, help="The dataset the version is added to.")
@click.option("--validation", type=click.FloatRange(0, 0.5), default=0.05, show_default=True,
              help="The share of rows held out.")
def feedback_export_cmd(c: Ctx, deployment, dataset, validation):
    """A dataset version of DEPLOYMENT's corrections: prompt/response rows (SFT) and prompt/chosen/rejected
    rows (DPO), with lineage back to the models that served them."""
    api.validate_dataset_name(dataset)
    with c.open_vault() as v:
        r = api.feedback_export(v, deployment, dataset, validation)
    c.emit(r, f"{r['version']}: {r['rows']} corrections from {deployment} ({r['table']}; columns instruction, "
              "response, chosen, rejected)")
