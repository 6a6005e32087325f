"""`appliance quantize`, `generate`, `chat`, `serve`: GGUF export and llama.cpp inference (thin over
`appliance.api`: serving). generate/chat/serve need no vault and no passphrase, so they run on edge devices."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from appliance import api
from appliance.api.format import blank_note, human_bytes, num
from appliance.cli.app import Ctx, cli, command
from appliance.cli.output import StageProgress, err, out, table
from appliance.errors import ApplianceError, UsageError


class QualityFlagged(ApplianceError):
    """--strict and the quality report flagged the export; the report was already printed."""

    json_emitted = True


@command(cli, "quantize")
@click.argument("model", required=False)
@click.option("--type", "qtype", default="q4_k_m", show_default=True,
              help="f32, f16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0.")
@click.option("--imatrix", "imatrix_ref", default=None, metavar="DATASET@N",
              help="Compute an importance matrix on this dataset version's train split and quantize with it.")
@click.option("--eval", "eval_ref", default=None, metavar="DATASET@N",
              help="Data for the quality report (its validation split). Default: the model's own dataset.")
@click.option("--eval-tokens", type=click.IntRange(64, 1 << 20), default=2048, show_default=True,
              help="Tokens of held-out text the perplexity is measured on.")
@click.option("--imatrix-tokens", type=click.IntRange(64, 1 << 22), default=8192, show_default=True)
@click.option("--ppl-bound", type=click.FloatRange(0, 1000), default=None,
              help="Flag the export when perplexity rises more than this many percent (default per type: "
                   "f32 0.1, f16 0.5, q8_0 1, q6_k 2, q5_k_m 4, q4_k_m 8, q4_0 15).")
@click.option("--strict", is_flag=True, help="Exit 1 when the quality report flags the export.")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="CPU threads (0: all, at most 8).")
@click.option("--list", "list_", is_flag=True, help="List the GGUF files the vault knows.")
def quantize_cmd(c: Ctx, model, qtype, imatrix_ref, eval_ref, eval_tokens, imatrix_tokens, ppl_bound, strict,
                 threads, list_):
    """Export MODEL (NAME@K or NAME) to GGUF, quantize it, and prove its quality against the source.

    Writes artifacts/gguf/MODEL-TYPE/ with the .gguf, an Ollama Modelfile and appliance.json (provenance
    and the quality report), and records the GGUF as lineage node MODEL:TYPE.
    """
    if list_:
        return _list(c)
    if not model:
        raise UsageError("missing MODEL", "pass a model id (see `appliance train models`) or --list")
    api.quantize_type(qtype)  # a bad --type is a usage error before the passphrase is asked
    bar = StageProgress(not c.json)
    with c.open_vault() as v:
        try:
            res = api.quantize(v, model, qtype, imatrix_ref, eval_ref, ppl_bound, eval_tokens, imatrix_tokens,
                               threads, progress=bar)
        finally:
            bar.stop()
    failure = (QualityFlagged(f"{res['id']} failed its quality bounds", "see the flags above; the file was kept "
                              "and recorded as flagged") if strict and res["flagged"] else None)
    if strict and not failure and res["quality"].get("warning"):  # too little text to judge it by
        failure = QualityFlagged(f"{res['id']}: {res['quality']['warning']}", "the file was kept and recorded")
    data = dict(res)
    if failure:
        data.update(ok=False, error=failure.message, hint=failure.hint, exit_code=1)
    c.emit(data, lambda: _human(res))
    if failure:
        raise failure


def _human(res: dict) -> None:
    q, fb = res["quality"], res["fallbacks"]
    matrix = f", importance matrix from {res['imatrix']}" if res["imatrix"] else ""
    out.print(f"[bold]{res['id']}[/]{' (exported before)' if res['existing'] else ''}  {human_bytes(res['size'])}, "
              f"{res['bits_per_weight']:.2f} bits/weight, {res['params']:,} parameters{matrix}")
    out.print(f"tensors: {', '.join(f'{k} {n}' for k, n in res['tensor_types'].items())}")
    out.print(f"quality on {q['eval_data']} ({q['eval_split']}, {q['tokens']} tokens): perplexity "
              f"{num(q['ppl_source'])} -> {num(q['ppl_gguf'])} ({q['ppl_delta_pct']:+.2f} %), top-1 agreement "
              f"{q['top1_agreement']:.2%}, max |logit diff| {num(q['max_logit_diff'])}, KL {num(q['mean_kld'])}")
    if q.get("eval_reason"):
        out.print(f"quality data: {q['eval_data']}, {q['eval_reason']}")
    out.print(f"tokenizer: {q['tokenizer_agreed']}/{q['tokenizer_records']} held-out records tokenized "
              "identically by llama.cpp")
    if fb:
        stored = sorted({f["stored_as"] for f in fb})
        out.print(f"fallbacks: {len(fb)} tensor(s) stored as {', '.join(stored)}: {fb[0]['why']}"
                  + (" (and others; see --json)" if len(fb) > 1 else ""))
    for flag in q["flags"]:
        err.print(f"warning: {flag}", markup=False)
    if q.get("warning"):
        err.print(f"warning: {q['warning']}", markup=False)
    out.print(f"saved to {res['path']} (Ollama Modelfile beside it)")


def _list(c: Ctx) -> None:
    with c.open_vault(read_only=True) as v:
        rows = api.quantize_list(v)["gguf"]
    c.emit({"gguf": rows}, lambda: table(
        ["id", "type", "size", "bits/weight", "ppl delta", "top-1", "flagged", "created"],
        [[r["id"], r["type"], human_bytes(r["size"]), num(r["bits_per_weight"]), _pct(r["ppl_delta_pct"], "+.2f"),
          _pct(r["top1_agreement"], ".2%"), "yes" if r["flagged"] else "", r["created"]] for r in rows])
        if rows else out.print("no GGUF files yet: `appliance quantize MODEL --type q4_k_m`"))


def _pct(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) + ("%" if not fmt.endswith("%") else "")


_SAMPLING = [
    click.option("--max-tokens", type=click.IntRange(1, 1 << 16), default=128, show_default=True),
    click.option("--temperature", type=click.FloatRange(0, 5), default=0.8, show_default=True),
    click.option("--seed", type=int, default=None, help="Seed for sampling (repeatable output)."),
    click.option("--ctx", "n_ctx", type=click.IntRange(0, 1 << 20), default=0, help="Context length (0: the model's)."),
    click.option("--threads", type=click.IntRange(0, 256), default=0, help="CPU threads (0: all, at most 8)."),
]


def _sampling(f):
    for opt in reversed(_SAMPLING):
        f = opt(f)
    return f


_BUNDLE = [
    click.option("--identity", "identities", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
                 help="Secret key an encrypted bundle is addressed to: MODEL may then be a GGUF bundle, run "
                      "decrypted in memory only (edge devices); repeatable."),
    click.option("--trust", "trusted", multiple=True, type=click.Path(path_type=Path),
                 help="The bundle signer's public key or a trust directory (default: the home's trust store)."),
]


def _bundle_opts(f):
    for opt in reversed(_BUNDLE):
        f = opt(f)
    return f


_gpu_layers = click.option("--gpu-layers", "gpu_layers", type=click.IntRange(-1, 1 << 16), default=None,
                           help="Layers llama.cpp runs on the GPU (-1: all). Default: all on a CUDA build of "
                                "llama.cpp (`make setup` on a box with a GPU), none otherwise.")


@command(cli, "generate")
@click.argument("model")
@click.argument("prompt")
@_sampling
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True)
@_bundle_opts
@_gpu_layers
def generate_cmd(c: Ctx, model, prompt, max_tokens, temperature, seed, n_ctx, threads, top_p, identities, trusted,
                 gpu_layers):
    """Complete PROMPT with a GGUF (a path, or an id such as NAME@K:q4_k_m); streams as it goes.

    PROMPT `-` reads the prompt from standard input. A GGUF file needs no vault, and neither does a GGUF bundle
    (with --identity when it is encrypted): edge devices run them from memory. A GGUF id of the home is sealed
    there, and needs the passphrase for a moment.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    with _unsealed(c, model, identities=identities, trusted=trusted) as path:
        llm = api.gguf_open(path, n_ctx, threads, gpu_layers)
    pieces = []
    for piece in api.generate(llm, prompt, max_tokens, temperature, top_p, seed):
        pieces.append(piece)
        if not c.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(pieces)
    note = blank_note(text)
    if c.json:
        c.emit({"model": model, "text": text, "blank": note is not None})
    else:
        sys.stdout.write("\n")
        if note:  # an undertrained model answers "\n\n\n": say so rather than print nothing visible
            err.print(note, markup=False)


@command(cli, "chat")
@click.argument("model")
@_sampling
@click.option("--system", default="", help="A system message that opens the conversation.")
@_bundle_opts
@_gpu_layers
def chat_cmd(c: Ctx, model, max_tokens, temperature, seed, n_ctx, threads, system, identities, trusted, gpu_layers):
    """Talk to a GGUF chat model in the terminal, streaming its replies. /reset forgets, /exit leaves."""
    with _unsealed(c, model, identities=identities, trusted=trusted) as path:
        llm = api.gguf_open(path, n_ctx, threads, gpu_layers)
    if not llm.metadata.get("tokenizer.chat_template"):
        raise UsageError(f"{model} has no chat template", "use `appliance generate` for plain completion")

    def read(prompt: str) -> str:
        if sys.stdin.isatty():
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    def write(s: str) -> None:
        if not c.json:  # with --json, stdout carries only the final object
            sys.stdout.write(s)
            sys.stdout.flush()

    replies = api.chat(llm, read, write, system, max_tokens, temperature, seed)
    if c.json:
        c.emit({"model": model, "turns": len(replies), "replies": replies})


@command(cli, "serve")
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--ctx", "n_ctx", type=click.IntRange(0, 1 << 20), default=0, help="Context length (0: the model's).")
@click.option("--threads", type=click.IntRange(0, 256), default=0, help="CPU threads (0: all, at most 8).")
@click.option("--name", default=None, help="The model name clients ask for (default: the file's name).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages of this exact origin (scheme://host[:port]) call the server; repeatable. "
                   "Default: no CORS headers, so no web page can read the answers.")
@click.option("--model", "model_opt", default=None, help="The model in service (A/B serving; instead of MODEL).")
@click.option("--candidate", default=None, help="A model on trial, answering a share --split of conversations.")
@click.option("--split", type=click.FloatRange(0, 1), default=None, help="The candidate's share (0..1).")
@click.option("--deployment", default=None, help="Serve (and, given --model, create or change) this deployment.")
@click.option("--record", is_flag=True, help="Record requests and responses, scrubbed, in the vault (needs "
                                             "--deployment).")
@click.option("--flush-records", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Write recorded requests to the vault once this many are waiting ...")
@click.option("--flush-seconds", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="... or this often.")
@_bundle_opts
@_gpu_layers
def serve_cmd(c: Ctx, model, host, port, n_ctx, threads, name, cors_origins, model_opt, candidate, split, deployment,
              record, flush_records, flush_seconds, identities, trusted, gpu_layers):
    """Serve a GGUF over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    The API key, when set, comes from APPLIANCE_API_KEY_FILE or APPLIANCE_API_KEY (never a flag, which
    other users could read in the process list); clients send it as a Bearer token. No CORS headers are
    sent unless --cors-origin names the origins whose web pages may call it (never `*`).

    A/B serving: `--model A --candidate B --split 0.1` answers a tenth of conversations (sticky per `user`,
    else per API key or client) with B; `--deployment NAME` serves a deployment of the vault (with --model,
    created or changed first) and `--record` keeps its requests and responses, PII-scrubbed, in the vault.
    This server has /v1/models, /v1/chat/completions and /v1/feedback.
    """
    if model and model_opt:
        raise UsageError("give the model once: MODEL or --model", "e.g. appliance serve --model A --candidate B")
    if not (model_opt or candidate or split is not None or deployment or record):
        if not model:
            raise UsageError("no model to serve", "appliance serve MODEL, or --model A [--candidate B --split 0.1]")
        return _serve_one(c, model, host, port, n_ctx, threads, name, cors_origins, identities, trusted, gpu_layers)
    model = model or model_opt
    if record and not deployment:
        raise UsageError("--record needs --deployment NAME", "records are kept per deployment in the vault")
    if not deployment and not model:
        raise UsageError("--model is required", "e.g. appliance serve --model A --candidate B --split 0.1")
    if not deployment and split and not candidate:
        raise UsageError("--split needs --candidate", "name the model on trial with --candidate")
    exposure = api.serve_exposure(host, cors_origins)  # the origins, the key and the host, before the models load
    if deployment and model:
        api.deploy_spec(deployment, model, candidate, split or 0.0, record)  # before the passphrase

    def ready(url: str) -> None:
        what = deployment or model
        if c.json:
            c.emit({"model": what, "url": url, "auth": bool(exposure.api_key)})
        else:
            err.print(f"serving {what} at {url} (OpenAI-compatible, with /v1/feedback)"
                      f"{' with an API key' if exposure.api_key else ''}; Ctrl-C stops", markup=False)

    if not deployment:
        if any(api.is_bundle(m) for m in (model, candidate) if m):
            raise UsageError("A/B serving takes GGUF ids or files, not bundles",
                             "import the bundle (`appliance bundle import`), then serve its GGUF id")
        with _unsealed(c, model, candidate):  # keys held while the server runs; the vault is let go
            api.serve_ab(model, candidate, split or 0.0, exposure.host, port, n_ctx, threads, exposure.api_key,
                         exposure.cors_origins, name, c.home, on_ready=ready)
        return
    with c.open_vault() as v:
        if model:
            api.deploy_create(v, deployment, model, candidate, split or 0.0, record)
        elif record:
            d = api.deploy_show(v, deployment)["deployment"]
            api.deploy_create(v, deployment, d["model"], d["candidate"], d["split"], True)
        done = api.serve_deployment(v, deployment, exposure.host, port, n_ctx, threads, exposure.api_key,
                                    exposure.cors_origins, flush_records, flush_seconds, on_ready=ready)
    if done and not c.json:
        err.print(f"recorded {done['records']} responses and {done['feedback']} feedback into the vault"
                  + (f"; {done['dropped']} could not be written" if done.get("dropped") else ""), markup=False)


@contextlib.contextmanager
def _unsealed(c: Ctx, *models: str | None, identities=(), trusted=()):
    """The located GGUF of the first of `models`; for sealed GGUFs of the home, the vault is opened for the
    moment their keys are read and closed when the block ends (after the model loaded into memory). A bundle
    file is checked and its GGUF decrypted into memory."""
    if models and models[0] and api.is_bundle(models[0]):
        with api.gguf_bundle(models[0], identities, trusted, c.home.root if c.home.exists() else None) as p:
            yield p
        return
    paths = [api.gguf_locate(m, c.home) for m in models if m]
    if not any(api.gguf_sealed(p) for p in paths):
        yield paths[0] if paths else None
        return
    with _vault_of(c, paths) as v:
        api.gguf_keys(v, paths)
        yield paths[0]


def _vault_of(c: Ctx, paths: list[Path]):
    """The vault (read-only) whose artifacts hold the sealed GGUFs `paths`: --home's, or the home a path lies in."""
    home = api.gguf_home(paths[0]) if c.home_arg is None and not os.environ.get("APPLIANCE_HOME") else None
    if home is not None and home != c.home.root:
        return api.open(home, api.get_passphrase(), read_only=True)
    return c.open_vault(read_only=True)


def _serve_one(c: Ctx, model, host, port, n_ctx, threads, name, cors_origins, identities=(), trusted=(),
               gpu_layers=None):
    exposure = api.serve_exposure(host, cors_origins)  # the origins, the key and the host, before the model loads
    with contextlib.ExitStack() as stack:
        _serve_from(stack, c, exposure, model, port, n_ctx, threads, name, identities, trusted, gpu_layers)


def _serve_from(stack, c: Ctx, exposure, model, port, n_ctx, threads, name, identities, trusted, gpu_layers=None):
    key = exposure.api_key
    if api.is_bundle(model):  # checked and decrypted into memory: never on this disk in the clear
        path = stack.enter_context(api.gguf_bundle(model, identities, trusted,
                                                   c.home.root if c.home.exists() else None))
        name = name or Path(model).stem
    else:
        path = api.gguf_locate(model, c.home)
    if api.gguf_sealed(path):  # its key read now, the vault let go: the model loads into memory only
        v = stack.enter_context(_vault_of(c, [path]))
        api.gguf_keys(v, [path])

    def ready(url: str) -> None:
        if c.json:
            c.emit({"model": str(path), "url": url, "auth": bool(key)})
        else:
            err.print(f"serving {path.name} at {url} (OpenAI-compatible){' with an API key' if key else ''}; "
                      "Ctrl-C stops", markup=False)

    api.serve(path, exposure.host, port, n_ctx, threads, key, name, on_ready=ready, cors_origins=exposure.cors_origins,
              n_gpu_layers=gpu_layers)
