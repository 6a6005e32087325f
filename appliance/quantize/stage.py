"""`appliance quantize MODEL --type T`: export, quantize, prove the quality, record the lineage.

Reads top to bottom: resolve the model and the data -> write an f32 GGUF with our writer -> (importance
matrix on vault data) -> llama.cpp quantizes -> the quality report against the source model -> Modelfile
and appliance.json beside the file -> lineage node `MODEL:TYPE` and an audit entry. Everything is built in
a temp directory beside its final place and renamed in when complete: a failure or a kill leaves nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance import refs, sealed
from appliance.errors import UsageError
from appliance.home import file_sha256
from appliance.memfiles import MemDir
from appliance.quantize import gguf_export, llama, quality, types
from appliance.quantize.types import QuantizeError, QuantType

Progress = Callable[[str, int, int], None]
MAX_TOKENIZER_RECORDS = 500


@dataclass
class QuantizeResult:
    id: str
    path: str
    type: str
    source: str
    size: int
    bits_per_weight: float
    params: int
    tensor_types: dict
    fallbacks: list[dict]
    quality: dict
    imatrix: str | None = None
    imatrix_entries: int | None = None  # how many matrices llama.cpp took importance data for
    seconds: dict = field(default_factory=dict)
    existing: bool = False

    @property
    def flagged(self) -> bool:
        return not self.quality.get("ok", True)

    def to_json(self) -> dict:
        return {**self.__dict__, "flagged": self.flagged}


def gguf_dir(home_artifacts: Path, gguf_id: str) -> Path:
    """`artifacts/gguf/NAME@K-TYPE/`: no ':' in file names, so the files copy onto any edge filesystem."""
    return home_artifacts / "gguf" / gguf_id.replace(":", "-")


def quantize(vault, model_ref: str, type_name: str, imatrix_ref: str | None = None, eval_ref: str | None = None,
             ppl_bound: float | None = None, eval_tokens: int = 2048, imatrix_tokens: int = 8192,
             threads: int = 0, progress: Progress = lambda s, d, t: None) -> QuantizeResult:
    """Export `model_ref` as a GGUF of `type_name`, with its quality report; see the module docstring."""
    from appliance.vault import lineage
    from appliance.version import code_version

    qt = types.get(type_name)
    if imatrix_ref and qt.block == 1:
        raise UsageError(f"--imatrix does nothing for {qt.name}", "an importance matrix guides quantized types only")
    model_id = refs.model(vault.con, model_ref)  # NAME@K, or NAME for the newest
    model_dir = vault.home.artifacts / "models" / model_id
    if not model_dir.is_dir():
        raise QuantizeError(f"the files of model {model_id} are missing from {model_dir}", "retrain or re-import it")
    gid = f"{model_id}:{qt.name}" + ("-imatrix" if imatrix_ref else "")
    final = gguf_dir(vault.home.artifacts, gid)
    imatrix_ds = refs.dataset(vault.con, imatrix_ref) if imatrix_ref else None
    eval_ds = refs.dataset(vault.con, eval_ref) if eval_ref else None
    if existing := _existing(vault.con, gid, final, imatrix_ds, eval_ds, ppl_bound, qt):  # no lock needed
        return existing
    with _export_lock(vault.home.root), sealed.opened(model_dir) as model_dir, \
            sealed.named(model_dir, model_id):  # the model, in memory; an error names it by its id
        if existing := _existing(vault.con, gid, final, imatrix_ds, eval_ds, ppl_bound, qt):  # made meanwhile
            return existing
        reason = "given with --eval" if eval_ds else \
            f"the nearest dataset in {model_id}'s lineage (its training data)"
        eval_ds = eval_ds or _data_of(vault.con, model_id)
        pl = gguf_export.plan(model_dir)  # every problem with the model shows before any work starts
        model_node = lineage.node(vault.con, model_id)
        meta = {"id": gid, "type": qt.name, "source": model_id, "source_hash": model_node["content_hash"] or "",
                "code_version": code_version(), "name": gid}
        threads = threads or min(os.cpu_count() or 1, 8)
        secs: dict[str, float] = {}
        fname = f"{final.name}.gguf"
        # What the work needs from the vault is read now (bounded: held-out records and a token budget), so the
        # vault is free for the console and other jobs while the model is exported, quantized and measured.
        tok = _tokenizer(model_dir)
        eval_split, eval_recs = _records(vault.con, eval_ds)
        reason += "; its validation split" if eval_split == "validation" else \
            "; its train split, as it has no validation records (the model has seen this text)"
        imatrix_stream = None
        if imatrix_ds:
            imatrix_stream = quality.token_stream(_ids(tok), tok.eos_token_id, _texts(vault.con, imatrix_ds, "train"),
                                                  imatrix_tokens)
        _sweep(final.parent)
        # Built in memory (links to in-memory files the exporter and llama.cpp write through), sealed when done.
        names = (*(["source-f32.gguf"] if qt.name != "f32" else []), fname, "Modelfile", "appliance.json")
        with MemDir(vault.home.tmp) as mem:
            for n in dict.fromkeys(names):
                mem.new(n)
            tmp = mem.path
            with vault.released():
                t0 = time.perf_counter()
                f32 = tmp / ("source-f32.gguf" if qt.name != "f32" else fname)
                info = gguf_export.write(model_dir, f32, meta, lambda d, t: progress("export", d, t), pl)
                secs["export"] = time.perf_counter() - t0
                source = _load_source(model_dir)
                ctx = min(info["context"], 512)
                imat, imat_used = None, None
                if imatrix_stream is not None:
                    t0 = time.perf_counter()
                    from appliance.quantize.imatrix import compute

                    windows = quality.windows_of(imatrix_stream, ctx)
                    if not windows:
                        raise UsageError(f"{imatrix_ds} has no training text for an importance matrix",
                                         "pass another --imatrix DATASET@N")
                    imat = compute(source, windows, lambda d, t: progress("imatrix", d, t))
                    secs["imatrix"] = time.perf_counter() - t0
                out = tmp / fname
                if qt.name != "f32":
                    t0 = time.perf_counter()
                    progress("quantize", 0, 1)
                    log = llama.quantize(f32, out, qt, imat, threads)
                    if imat is not None:
                        imat_used = _imatrix_used(log)
                    f32.unlink()
                    mem.files.pop(f32.name).close()
                    progress("quantize", 1, 1)
                    secs["quantize"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                rep = _quality(source, tok, out, qt, eval_ds, eval_split, eval_recs, eval_tokens, ctx, ppl_bound,
                               threads, progress)
                rep.eval_reason = reason
                secs["quality"] = time.perf_counter() - t0
                tensors = llama.tensor_types(out)
                res = QuantizeResult(
                    id=gid, path=str(final / fname), type=qt.name, source=model_id, size=out.stat().st_size,
                    bits_per_weight=_bpw(tensors), params=info["params"], tensor_types=_type_counts(tensors),
                    fallbacks=fallbacks(tensors, qt), quality=rep.to_json(), imatrix=imatrix_ds,
                    imatrix_entries=imat_used, seconds={k: round(v, 3) for k, v in secs.items()})
                sha = file_sha256(out)
                (tmp / "Modelfile").write_text(modelfile(fname, info))
                (tmp / "appliance.json").write_text(json.dumps(
                    {**meta, "sha256": sha, "eval_data": eval_ds, "imatrix_data": imatrix_ds, "result": res.to_json(),
                     "tensors": tensors}, indent=2, default=str))
                sealed.write_dir(final, {n: f for n, f in mem.check().items() if f.size})
        parents = [(model_id, "source"), (eval_ds, "eval")] + ([(imatrix_ds, "imatrix")] if imatrix_ds else [])
        attrs = {k: v for k, v in res.to_json().items() if k not in ("existing", "id")} | {"sha256": sha}
        with vault.transaction():
            lineage.add_node(vault.con, gid, "gguf", parents, content_hash=sha, attrs=attrs)
            vault.audit("quantize.export", [gid, model_id], {"type": qt.name, "size": res.size,
                                                             "ppl_delta_pct": rep.ppl_delta_pct,
                                                             "flags": len(rep.flags)})
        return res


def _existing(con, gid: str, final: Path, imatrix_ds: str | None, eval_ds: str | None, ppl_bound: float | None,
              qt: QuantType) -> QuantizeResult | None:
    """The same model and type were exported before: ids are never reused, so hand back that export.

    Its quality numbers stand; the flags are judged again against the bound asked for now.
    """
    from appliance.vault import lineage

    node = lineage.find(con, gid)
    if node is None:
        return None
    attrs = node["attrs"]
    path = final / f"{final.name}.gguf"
    if not sealed.exists(path):
        raise QuantizeError(f"{gid} was exported before but its file {path} is gone",
                            "restore artifacts/gguf from a backup")
    if imatrix_ds and attrs.get("imatrix") != imatrix_ds:
        raise UsageError(f"{gid} already exists, quantized with the importance matrix of {attrs.get('imatrix')}",
                         "ids are never reused; use that export, or quantize another model version")
    q = attrs["quality"]
    if eval_ds and q["eval_data"] != eval_ds:
        raise UsageError(f"{gid} already exists and was measured on {q['eval_data']}",
                         "drop --eval to see that report")
    rep = quality.Report(**{k: v for k, v in q.items() if k in quality.Report.__dataclass_fields__ and k != "flags"})
    quality.judge(rep, qt.ppl_bound if ppl_bound is None else ppl_bound, qt.exact)
    keep = {k: v for k, v in attrs.items() if k in QuantizeResult.__dataclass_fields__}
    return QuantizeResult(**{**keep, "id": gid, "path": str(path), "quality": rep.to_json(), "existing": True})


@contextmanager
def _export_lock(home_root: Path):
    """Held for a whole export, so no other export in this home (a job, another shell) runs beside it: the
    vault is let go while the model is converted, and two exports would otherwise race for one id and sweep
    each other's temp directories. Never waited on while the vault is held: the holder needs the vault back
    to finish, so waiting here could deadlock; a second export is refused instead."""
    import fcntl

    fd = os.open(home_root / ".export.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantizeError("another quantize is running in this home",
                                "wait for it to finish (`appliance jobs list`), then run this again") from None
        yield
    finally:
        os.close(fd)


def _sweep(gguf_root: Path) -> None:
    """Temp directories a killed export left (the export lock means no other export is running)."""
    import shutil

    if gguf_root.is_dir():
        for d in gguf_root.iterdir():
            if d.name.startswith(".") and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def _data_of(con, model_id: str) -> str:
    """The nearest dataset version in the model's ancestry (what it was trained or fine-tuned on)."""
    from appliance.vault import lineage

    if found := lineage.nearest_dataset(con, model_id):
        return found
    raise UsageError(f"{model_id} has no dataset in its lineage to measure quality on",
                     "pass --eval DATASET@N (its validation split is used)")


def _texts(con, ref: str, split: str):
    from appliance.vault.versions import iter_records

    for rec in iter_records(con, ref, split=split):
        yield rec["text"]


def _ids(tok):
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _records(con, ref: str) -> tuple[str, list[tuple[int, str]]]:
    """Held-out records (position in the version, text): the validation split, else the train split."""
    from itertools import islice

    from appliance.vault.versions import held_out

    split, records = held_out(con, ref)
    recs = [(r["ord"], r["text"]) for r in islice(records, MAX_TOKENIZER_RECORDS)]
    if recs:
        return split, recs
    raise UsageError(f"{ref} has no records to measure quality on", "pass --eval DATASET@N with text in it")


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    with sealed.opened(model_dir, weights=False) as d:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _load_source(model_dir: Path):
    from appliance.quantize.imatrix import load_source

    return load_source(model_dir)


def _quality(source, tok, path: Path, qt: QuantType, eval_ds: str, split: str, recs: list[tuple[int, str]],
             eval_tokens: int, ctx: int, ppl_bound: float | None, threads: int, progress: Progress) -> quality.Report:
    rep = quality.Report(qt.name, eval_ds, split, window=ctx)
    llm = llama.load(path, n_ctx=ctx, logits_all=True, threads=threads)
    try:
        progress("tokenizer check", 0, len(recs))
        quality.tokenizer_agreement(llm, tok, recs, rep)
        progress("tokenizer check", len(recs), len(recs))
        stream = quality.token_stream(_ids(tok), tok.eos_token_id, (t for _, t in recs), eval_tokens)
        windows = quality.windows_of(stream, ctx)
        if not windows:
            raise UsageError(f"{eval_ds} gives too little text to measure perplexity", "pass a larger --eval")
        quality.compare(source, llm, windows, rep, lambda d, t: progress("perplexity", d, t))
    finally:
        llm.close()
    quality.judge(rep, qt.ppl_bound if ppl_bound is None else ppl_bound, qt.exact)
    quality.warn_if_thin(rep, eval_tokens)
    return rep


def _imatrix_used(log: str) -> int:
    """How many entries llama.cpp took; a matrix it found none for (but the embedding table) is an error."""
    import re

    m = re.search(r"have importance matrix data with (\d+) entries", log)
    if not m:
        raise QuantizeError("llama.cpp did not take the importance matrix", "rerun with APPLIANCE_DEBUG=1")
    missing = [n for n in re.findall(r"did not find weights for (\S+)", log) if n != "token_embd.weight"]
    if missing:
        raise QuantizeError(f"the importance matrix has no data for {', '.join(missing[:3])}",
                            "this is a bug in the appliance's importance matrix; quantize without --imatrix")
    return int(m.group(1))


def fallbacks(tensors: list[dict], qt: QuantType) -> list[dict]:
    """Matrices the chosen type could not take, because a row does not fill whole quantization blocks."""
    out = []
    for t in tensors:
        cols = t["shape"][0]
        if len(t["shape"]) >= 2 and qt.block > 1 and cols % qt.block:
            out.append({"tensor": t["name"], "stored_as": t["type"],
                        "why": f"rows of {cols} values are not a multiple of {qt.block}, the {qt.name} block"})
    return out


def _type_counts(tensors: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return dict(sorted(counts.items()))


def _bpw(tensors: list[dict]) -> float:
    return round(8.0 * sum(t["bytes"] for t in tensors) / max(1, sum(t["elements"] for t in tensors)), 3)


def modelfile(gguf_name: str, info: dict) -> str:
    """An Ollama Modelfile for sites that serve with Ollama: `ollama create NAME -f Modelfile`."""
    lines = [f"# ollama create {gguf_name.removesuffix('.gguf')} -f Modelfile", f"FROM ./{gguf_name}"]
    if info["chat_template"]:  # the appliance's tokenizers speak ChatML
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
                  "{{ .Content }}<|im_end|>", '{{ end }}<|im_start|>assistant', '"""',
                  'PARAMETER stop "<|im_end|>"']
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += ['PARAMETER stop "<|end_of_text|>"', f"PARAMETER num_ctx {info['context']}"]
    return "\n".join(lines) + "\n"


def exported(con) -> list[dict]:
    """Every GGUF the vault knows, newest first."""
    from appliance.vault import lineage

    out = []
    for n in lineage.nodes(con, ("gguf",), newest_first=True):
        a = n["attrs"]
        q = a.get("quality", {})
        out.append({"id": n["id"], "created": str(n["created"])[:19], "type": a.get("type"), "source": a.get("source"),
                    "size": a.get("size"), "bits_per_weight": a.get("bits_per_weight"),
                    "ppl_delta_pct": q.get("ppl_delta_pct"), "top1_agreement": q.get("top1_agreement"),
                    "flagged": not q.get("ok", True), "path": a.get("gguf_path") or a.get("path"),
                    "imported_from": a.get("imported_from")})
    return out
