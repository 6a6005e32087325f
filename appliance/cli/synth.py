"""`appliance synth tables|edge-cases`: thin over `appliance.api` (data)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import api
from appliance.cli.app import Ctx, cli, command
from appliance.cli.output import StageProgress, out

_PII = click.Choice(["redact", "pseudonymize", "flag", "off"])


@cli.group("synth")
def synth_group():
    """New dataset versions made from the site's own data, marked synthetic in lineage."""


def _human(r: dict) -> None:
    dropped = ", ".join(f"{n} {why}" for why, n in r["dropped"].items()) or "none"
    pii = ", ".join(f"{k} {n}" for k, n in r["pii"].items()) or "none"
    out.print(f"{r['version']}: {r['records']} synthetic records ({r['generator']} from {r['source']}) in "
              f"{r['table']}; generated {r['generated']}, dropped {dropped}; PII scrubbed: {pii}")


@command(synth_group, "tables")
@click.argument("source")
@click.option("--template", type=click.Path(path_type=Path), required=True,
              help="TOML with [[qa]] question/answer templates over the table's columns, e.g. {asset_id}.")
@click.option("--dataset", "-d", required=True, help="Name of the new dataset; a version NAME@N is created.")
@click.option("--table", default=None, help="Which table of SOURCE (when it has several).")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Site policy TOML: banned = [...] terms drop a row; disclaimer = \"...\" ends every answer.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many pairs (a seeded sample).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pii", type=_PII, default="redact", show_default=True)
def synth_tables_cmd(c: Ctx, source, template, dataset, table, policy, limit, seed, pii):
    """Question/answer pairs from templates over real rows of a table in SOURCE (a version NAME@N)."""
    api.synth_check(template, policy)  # a bad file is refused before the passphrase is asked
    with c.open_vault() as v:
        r = api.synth_tables(v, source, template, dataset, table, policy, limit, seed, pii)
    c.emit(r, lambda: _human(r))


@command(synth_group, "documents")
@click.argument("source")
@click.option("--model", required=True, help="The local model that writes the pairs: a model or GGUF id, a model "
                                             "directory or a .gguf file.")
@click.option("--dataset", "-d", required=True, help="Name of the new dataset; a version NAME@N is created.")
@click.option("--passages", type=click.IntRange(1, 100_000), default=100, show_default=True,
              help="Paragraphs of SOURCE to write about, in order.")
@click.option("--min-grounding", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of an answer's content words that must appear in its passage.")
@click.option("--max-tokens", type=click.IntRange(4, 1024), default=48, show_default=True)
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Site policy TOML: banned = [...] terms drop a pair; disclaimer = \"...\" ends every answer.")
@click.option("--pii", type=_PII, default="redact", show_default=True)
def synth_documents_cmd(c: Ctx, source, model, dataset, passages, min_grounding, max_tokens, policy, pii):
    """Question/answer pairs a local model writes about passages of SOURCE (a version NAME@N), kept when
    the answer is grounded in its passage and the question is new."""
    api.synth_check(policy=policy)
    bar = StageProgress(not c.json)
    with c.open_vault() as v:
        try:
            r = api.synth_documents(v, source, model, dataset, passages, min_grounding, max_tokens, policy, pii, bar)
        finally:
            bar.stop()
    c.emit(r, lambda: _human(r))


@command(synth_group, "edge-cases")
@click.argument("source")
@click.option("--dataset", "-d", required=True, help="Name of the new dataset; a version NAME@N is created.")
@click.option("--table", default=None, help="Which table of SOURCE (when it has several).")
@click.option("--rows", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Site policy TOML: banned = [...] terms drop a row.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pii", type=_PII, default="redact", show_default=True)
def synth_edge_cases_cmd(c: Ctx, source, dataset, table, rows, policy, seed, pii):
    """Rows for the long tail of a table in SOURCE: unseen and rare combinations of its own values,
    numbers at and past their observed extremes; each says which case it covers (column edge_case)."""
    api.synth_check(policy=policy)
    with c.open_vault() as v:
        r = api.synth_edge_cases(v, source, dataset, table, rows, policy, seed, pii)
    c.emit(r, lambda: _human(r))
