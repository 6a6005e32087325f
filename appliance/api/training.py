"""Training: tokenizers, runs, recipes, imported models, adapters merged, metrics and plots, models and runs."""

from __future__ import annotations

from pathlib import Path


def train_tokenizer(v, dataset: str | list[str], vocab: int = 32000, name: str | None = None,
                    min_frequency: int = 2) -> dict:
    from appliance.train.tokenizer import train_tokenizer as train

    return train(v, dataset, vocab, name, min_frequency).to_json()


def train_run(v, recipe: str | dict, overrides: list[str] | None = None, resume: bool = False, gpus: int = 0,
              nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str = "", on_event=None) -> dict:
    """Train in this process (torchrun below it when `gpus` > 0); `recipe` is a name, a TOML path or its tables.

    `on_event(kind, data)` sees "start", "step", "checkpoint", "stage" and "warning" (over-fitting, once each)
    events as the CLI's progress does.
    """
    from appliance.errors import UsageError
    from appliance.train.config import build_recipe, load_recipe
    from appliance.train.launch import Nodes
    from appliance.train.run import run

    r = build_recipe(dict(recipe), overrides) if isinstance(recipe, dict) else load_recipe(recipe, overrides)
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give node 0's address and a free port")
    kw = {"on_event": on_event} if on_event else {}
    res = run(v, r, resume=resume, gpus=gpus, nodes=Nodes(nnodes, node_rank, rdzv_endpoint), **kw).to_json()
    return {**res, "notes": list(r.notes)}  # what loading adjusted (a warmup fitted to a shortened run)


def train_recipes(keys: bool = False, home: Path | None = None) -> dict:
    """The shipped recipes, or (with `keys`) every recipe key with its default and meaning. Needs no vault.

    Parameter counts use the vocabulary of the recipe's tokenizer when `home` has it, else 32,000 tokens;
    `parameters.vocab_size` and `parameters.vocab_from` (the tokenizer id, or null) say which.
    """
    from appliance.train.config import describe, load_recipe, recipe_purpose, shipped
    from appliance.train.model import count_parameters, tokenizer_vocab

    if keys:
        return {"keys": describe()}
    items = []
    for name, path in shipped().items():
        r = load_recipe(str(path))
        params = None
        if r.stage == "pretrain":
            tok, vocab = tokenizer_vocab(home, r.data.tokenizer) if home else (None, 32000)
            params = {**count_parameters(r.model, vocab), "vocab_size": vocab, "vocab_from": tok}
        items.append({"name": name, "path": str(path), "stage": r.stage, "method": r.method,
                      "arch": r.model.arch if r.stage == "pretrain" else None, "parameters": params,
                      "command": path.read_text().splitlines()[0].lstrip("# "), "purpose": recipe_purpose(path)})
    return {"recipes": items}


def train_import(v, src: str | Path, name: str, progress=None) -> dict:
    """A transformers directory, or a model GGUF dequantized into one (`quantize.gguf_import`, checked against
    llama.cpp on the file itself)."""
    from appliance.quantize import gguf_import
    from appliance.train.run import import_model

    src = Path(src)
    if src.is_file() and gguf_import.is_gguf(src):
        gguf_import.read(src)  # refusals come before anything is written
        from appliance.home import file_sha256

        digest = file_sha256(src)  # what lineage records is what was read: checked again after the import

        def convert(staged) -> dict:  # into the in-memory directory the import stages in
            record = gguf_import.source_record(src, gguf_import.convert(src, staged, progress or (lambda d, t: None)))
            if record["files"][src.name] != digest:
                from appliance.errors import UsageError

                raise UsageError(f"{src} changed while it was imported", "import it again once it is complete")
            return record

        return import_model(v, src, name, convert=convert)
    if src.is_file():
        from appliance.errors import UsageError

        raise UsageError(f"{src} is neither a model directory nor a GGUF file",
                         "import a local transformers model directory or a .gguf model file")
    return import_model(v, src, name)


def train_merge(v, adapter: str) -> dict:
    from appliance.train.run import merge

    merged = merge(v, adapter)
    return {"id": merged, "path": str(v.home.artifacts / "models" / merged)}


def train_metrics(v, run_id: str) -> dict:
    from appliance.errors import VaultError
    from appliance.train.run import metrics

    rows = metrics(v.con, run_id)
    if not rows:
        raise VaultError(f"no metrics for run {run_id}", "list runs with `appliance train runs`")
    return {"run": run_id, "metrics": rows}


def train_plot(v, runs: list[str], out: str | Path) -> dict:
    """The training loss of runs per step, as a PNG."""
    from appliance.errors import UsageError
    from appliance.eval.plots import loss_png
    from appliance.train.run import losses

    curves = {r: losses(v.con, r) for r in runs}
    if empty := [r for r, ls in curves.items() if not ls]:
        raise UsageError(f"no training metrics for {', '.join(empty)}", "list runs with `appliance train runs`")
    from appliance.exchange import exported

    with exported(v, "train.plot", runs, out) as path:
        loss_png(curves, path)
    return {"out": str(out), "runs": list(curves)}


def train_models(v) -> dict:
    from appliance.train.run import models

    return {"models": models(v.con)}


def train_runs(v, name: str | None = None) -> dict:
    from appliance.train.run import runs

    return {"runs": runs(v.con, name)}


def train_recipe_notes(recipe: str, overrides: list[str] | None = None) -> list[str]:
    """Load `recipe` (a shipped name or a TOML path) with `overrides`, raising what `train_run` would for a bad
    one, and return what loading adjusted (a warmup fitted to a shortened run): said before a vault is opened."""
    from appliance.train.config import load_recipe

    return list(load_recipe(recipe, overrides).notes)
