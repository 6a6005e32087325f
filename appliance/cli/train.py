"""`appliance train ...`: tokenizers, training runs, imports, merges, runs and their metrics."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import click

from appliance import api
from appliance.api.format import num
from appliance.cli.app import Ctx, cli, command, recipe_overrides
from appliance.cli.output import ProgressBar, TrainProgress, err, out, table


# --- train ---------------------------------------------------------------------------------------
@cli.group("train")
def train_group():
    """Train tokenizers and models on vault data: pretrain, continue, SFT (full, LoRA, QLoRA)."""


@command(train_group, "tokenizer")
@click.option("--dataset", "-d", "datasets", required=True, multiple=True,
              help="Dataset version to train on (NAME@N or NAME); repeat it to train on several.")
@click.option("--vocab", type=int, default=32000, show_default=True, help="Vocabulary size.")
@click.option("--name", default=None, help="Tokenizer name (default: DATASET-bpe); saved as NAME@K.")
@click.option("--min-frequency", type=click.IntRange(1, 1000), default=2, show_default=True)
def train_tokenizer_cmd(c: Ctx, datasets, vocab, name, min_frequency):
    """Train a byte-level BPE tokenizer on the train split of one or more dataset versions."""
    with c.open_vault() as v:
        res = api.train_tokenizer(v, list(datasets), vocab, name, min_frequency)
    c.emit(res, f"{res['id']}: {res['vocab_size']} tokens from {res['records']} records of "
                f"{', '.join(res['datasets'])}\n"
                f"saved to {res['path']}")



@command(train_group, "run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("recipe")
@click.option("--resume", is_flag=True, help="Continue the newest unfinished run of this recipe's name "
                                             "from its last checkpoint.")
@click.option("--gpus", type=click.IntRange(0, 64), default=0,
              help="Processes on this node (torchrun; DDP or FSDP2). Without GPUs: CPU processes with gloo.")
@click.option("--nnodes", type=click.IntRange(1, 1024), default=1, help="Nodes in a multi-node run.")
@click.option("--node-rank", type=click.IntRange(0, 1023), default=0, help="This node's rank (multi-node).")
@click.option("--rdzv-endpoint", default="", help="HOST:PORT of node 0 for torchrun's rendezvous (multi-node).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable); "
                                                                       "also --KEY VALUE, e.g. --train.lr 1e-4.")
@click.pass_context
def train_run_cmd(ctx, c: Ctx, recipe, resume, gpus, nnodes, node_rank, rdzv_endpoint, sets):
    """Train as RECIPE says (a shipped recipe name or a TOML file): pretrain, continue or sft.

    Every recipe value can be overridden: `appliance train run tiny-dense --train.max_steps 100`.
    Ctrl-C stops at a checkpoint; `--resume` continues from it.
    """
    from appliance.errors import UsageError

    overrides = recipe_overrides(sets, ctx.args)
    for note in api.train_recipe_notes(recipe, overrides):  # a bad recipe is reported before the passphrase is asked
        err.print(f"note: {note}", markup=False)
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give node 0's address and a free port")
    progress = TrainProgress(not c.json)
    with c.open_vault() as v:
        try:
            res = api.train_run(v, recipe, overrides, resume, gpus, nnodes, node_rank, rdzv_endpoint, progress)
        finally:
            progress.stop()
    c.emit(res, lambda: out.print(
        f"{res['id']}: {res['stage']}/{res['method']}, {res['steps']} steps, final loss "
        f"{num(res['loss'])}, "
        f"{res['tokens_per_s']:,.0f} tok/s, padding {res['data']['padding_fraction']:.2%}\n"
        f"saved to {res['model_path'] or 'node 0 (this node ran worker ranks only)'}"
        + (f"\nmerged: {res['merged']}" if res["merged"] else "")))


@contextmanager
def _vault_unasked(c: Ctx):
    """The home's vault, read-only, when it opens without asking (the passphrase in the environment, or its
    file); otherwise nothing, and a listing counts with an assumed vocabulary rather than prompt for it."""
    if not (os.environ.get("APPLIANCE_PASSPHRASE_FILE") or os.environ.get("APPLIANCE_PASSPHRASE")) \
            or not c.home.exists():
        yield None
        return
    with c.open_vault(read_only=True) as v:
        yield v


@command(train_group, "recipes")
@click.option("--keys", is_flag=True, help="List every recipe key with its default and meaning.")
def train_recipes_cmd(c: Ctx, keys):
    """The shipped recipes (model presets and stages), or every recipe key."""
    if keys:
        rows = api.train_recipes(keys=True)["keys"]
        c.emit({"keys": rows}, lambda: table(["key", "default", "meaning"],
                                             [[r["key"], str(r["default"]), r["help"]] for r in rows]))
        return
    with _vault_unasked(c):  # the home's tokenizers are sealed: their vocabulary opens with the vault's keys
        items = api.train_recipes(home=c.home)["recipes"]
    c.emit({"recipes": items}, lambda: (table(
        ["recipe", "stage", "arch", "parameters", "vocabulary"],
        [[i["name"], f"{i['stage']}/{i['method']}", i["arch"] or "base model", _params(i["parameters"]),
          _vocab(i["parameters"])] for i in items]),
        [out.print(f"{i['name']}: {i['purpose']}", markup=False) for i in items if i.get("purpose")],
        out.print("run one with `appliance train run NAME`; see its first line for an example "
                  "(`appliance train recipes --json`)")))


def _params(p: dict | None) -> str:
    if not p:
        return "-"
    fmt = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"  # noqa: E731
    return fmt(p["total"]) + (f" ({fmt(p['active'])} active)" if p["active"] != p["total"] else "")


def _vocab(p: dict | None) -> str:
    if not p:
        return "base model's"
    return f"{p['vocab_size']:,} ({p['vocab_from']})" if p.get("vocab_from") else f"{p['vocab_size']:,} (assumed)"


@command(train_group, "import")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name; imported as NAME@K.")
def train_import_cmd(c: Ctx, src, name):
    """Import a base model: a local transformers directory (e.g. unpacked from a bundle) or a model GGUF file.

    A GGUF is dequantized into a transformers model (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2) and checked
    against llama.cpp on the file itself: same tokens on hard strings, same next tokens on a probe.
    """
    bar = ProgressBar(not c.json, "dequantizing")
    start, advance = bar.callbacks()
    state = {"started": False, "done": 0}

    def progress(done: int, total: int) -> None:
        if not state["started"]:
            start(0, total)
            state["started"] = True
        advance(done - state["done"], "")
        state["done"] = done

    with c.open_vault() as v:
        try:
            res = api.train_import(v, src, name, progress=progress)
        finally:
            bar.stop()
    lines = [f"{res['id']}: {', '.join(res['architectures'] or ['model'])} from {src}", f"saved to {res['path']}"]
    g = (res.get("base") or {}).get("gguf")
    if g:
        lines.append(f"dequantized from {', '.join(g['tensor_types'])}; against llama.cpp on the file: "
                     f"{g['hard_strings']} hard strings tokenized alike, top-1 agreement {g['top1_agreement']:.3f} "
                     f"and max |logit diff| {g['max_logit_diff']:.2g} over {g['probe_tokens']} tokens")
    if res.get("tokenizer_rewritten"):
        lines.append(res["tokenizer_rewritten"])
    c.emit(res, "\n".join(lines))


@command(train_group, "merge")
@click.argument("adapter")
def train_merge_cmd(c: Ctx, adapter):
    """Merge a LoRA adapter (NAME@K) into its base: a plain model directory NAME-merged@K."""
    with c.open_vault() as v:
        res = api.train_merge(v, adapter)
    c.emit(res, f"{res['id']}: saved to {res['path']}")


@command(train_group, "runs")
@click.option("--name", default=None, help="Only runs of this name.")
def train_runs_cmd(c: Ctx, name):
    """Training runs, newest last, with their status and step."""
    with c.open_vault(read_only=True) as v:
        rows = api.train_runs(v, name)["runs"]
    c.emit({"runs": rows}, lambda: table(
        ["run", "stage", "status", "step", "updated", "error"],
        [[r["id"], f"{r['stage']}/{r['method']}", r["status"], f"{r['step']}/{r['max_steps']}",
          (r["updated"] or "")[:19], r["error"] or ""] for r in rows]))


@command(train_group, "metrics")
@click.argument("run_id")
def train_metrics_cmd(c: Ctx, run_id):
    """Per-step loss, learning rate, gradient norm and throughput of a run."""
    with c.open_vault(read_only=True) as v:
        res = api.train_metrics(v, run_id)
    rows = res["metrics"]
    c.emit(res, lambda: table(
        ["step", "loss", "lr", "grad norm", "tok/s"],
        [[m["step"], num(m["loss"]), num(m["lr"], 3), num(m["grad_norm"]), f"{m['tokens_per_s']:,.0f}"]
         for m in rows]))


@command(train_group, "models")
def train_models_cmd(c: Ctx):
    """Models and adapters in the appliance (trained, merged or imported)."""
    with c.open_vault(read_only=True) as v:
        items = api.train_models(v)["models"]
    c.emit({"models": items}, lambda: table(["model", "kind", "made by", "created"],
                                           [[i["id"], i["kind"], f"{i['stage'] or 'import'}/{i['method'] or '-'}",
                                             i["created"]] for i in items]))


@command(train_group, "plot")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
def train_plot_cmd(c: Ctx, runs, out_path):
    """Plot the training loss of runs (NAME@K) per step (PNG)."""
    with c.open_vault() as v:  # writable: the export is audited
        res = api.train_plot(v, list(runs), out_path)
    c.emit(res, f"wrote {out_path}")


# --- model -------------------------------------------------------------------------------------------
@cli.group("model")
def model_group():
    """Artifacts made here (models, adapters, tokenizers, GGUFs), sealed at rest; plain copies on purpose."""


@command(model_group, "export")
@click.argument("ref")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="New directory for the plain files.")
def model_export_cmd(c: Ctx, ref, out_path):
    """Write a model, adapter, tokenizer or GGUF as plain files (a transformers directory, or the .gguf).

    Explicit and audited, like `vault export`: the files are no longer sealed. Bundles stay the way models
    cross the air gap."""
    with c.open_vault() as v:
        res = api.model_export(v, ref, out_path)
    c.emit(res, lambda: (out.print(f"exported {res['id']} ({len(res['files'])} files) to {res['out']}"),
                         err.print("warning: these files are plaintext outside the vault")))
