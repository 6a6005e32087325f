"""`appliance train run`: the launcher. Vault side of a training run, around the stage functions.

load recipe -> resolve inputs (tokenizer or base model) -> pack rows (vault cache) -> open or resume the
run -> fit (in this process, or torchrun ranks fed over a socket) -> save -> lineage + audit.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance import refs, sealed
from appliance.db_time import utcnow
from appliance.errors import ApplianceError, UsageError
from appliance.memfiles import MemDir, MemFile
from appliance.train import checkpoint, data, launch, loop
from appliance.train.config import Recipe
from appliance.train.model import TrainError, load_tokenizer, merge_adapter, tree_hash
from appliance.train.spec import StageSpec
from appliance.train.stages import STAGES
from appliance.train.watch import LossWatch
from appliance.vault import lineage
from appliance.version import code_version

RESUMABLE = ("running", "interrupted", "failed")
# Keys a resumed run may change: how long it runs, how it checkpoints, and the step size (to recover from a
# diverged run), and how it is laid out on the GPUs (sharded checkpoints reshard on load); not the model, the
# data or the batch.
RESUME_MAY_CHANGE = {"train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.lr",
                     "train.min_lr", "train.warmup_steps", "train.grad_clip", "train.micro_batch_size",
                     "train.activation_checkpointing", "train.precision", "train.eval_every",
                     "train.early_stop_patience", "train.parallel", "train.gpu_memory_gb",
                     "train.compile", "train.sync_every", "train.checkpoint_async"}
# How inputs were named; what they resolved to (versions, tokenizer, base) is compared instead.
RESUME_RESOLVED = {"data.datasets", "data.tokenizer", "model.base"}


class TrainInterrupted(ApplianceError):
    exit_code = 130


@dataclass
class RunResult:
    id: str
    stage: str
    method: str
    status: str
    steps: int
    loss: float | None
    tokens: int
    seconds: float
    tokens_per_s: float
    model_path: str | None
    merged: str | None
    checkpoint: str | None
    resumed_from: int | None
    world: int
    data: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Inputs:
    tokenizer_path: Path
    base_path: Path | None
    parents: list[tuple[str, str]]


def resolve_node(con, ref: str, kinds: tuple[str, ...], what: str) -> str:
    """`NAME@K` as given, or `NAME` -> the newest NAME@K of one of `kinds` (`appliance.refs.node`)."""
    return refs.node(con, ref, kinds, what)


def inputs(vault, recipe: Recipe) -> Inputs:
    con, art = vault.con, vault.home.artifacts
    if recipe.stage == "pretrain":
        tok = resolve_node(con, recipe.data.tokenizer, ("tokenizer",), "tokenizer")
        return Inputs(art / "tokenizers" / tok, None, [(tok, "tokenizer")])
    base = resolve_node(con, recipe.model.base, ("model",), "base model")
    path = art / "models" / base
    if not path.is_dir():
        raise TrainError(f"the files of model {base} are missing from {path}", "re-import or retrain it")
    return Inputs(path, path, [(base, "base")])


def tokenizer_hash(path: Path, added_template: str = "") -> str:
    """Every file that changes how text becomes ids (vocabulary, specials, chat template), and the template the
    appliance gave a tokenizer that had none."""
    h = hashlib.sha256()
    with sealed.opened(path, weights=False) as d:
        for p in sorted(Path(d).iterdir()):
            if p.is_file() and p.name.startswith(("tokenizer", "chat_template", "special_tokens", "vocab", "merges")):
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    if added_template:
        h.update(b"added chat template\0" + added_template.encode())
    return h.hexdigest()


class Recorder:
    """Writes a run's progress to the vault (metrics per step, checkpoints) and tells the caller.

    While the model trains the vault is let go (`live`), so the console and other commands can read it;
    progress is buffered and written every few seconds in brief holds, and kept for the next try if
    another process has the vault at that moment.
    """

    FLUSH_EVERY = 5.0  # seconds; each flush attaches the vault (~0.1 s of CPU), which a 2-core box notices

    def __init__(self, vault, run_id: str, on_event: Callable[[str, dict], None], checkpoint_every: int = 0,
                 patience: int = 0, watch: LossWatch | None = None):
        self.vault, self.run_id, self.on_event = vault, run_id, on_event
        self.watch = watch or LossWatch()
        self.checkpoint_every, self.patience = checkpoint_every, patience
        self.best_val: float | None = None
        self.since_best = 0
        self.stopped_early: int | None = None
        self.lock = threading.Lock()  # guards what is pending
        self.flushing = threading.Lock()  # one hold on the vault at a time
        self.pending: list[list] = []
        self.last_checkpoint: str | None = None

    def step(self, m: dict) -> str | None:
        """Record a step; "finish" when the validation loss has stopped improving (early stopping)."""
        with self.lock:
            self.pending.append([self.run_id, m["step"], m["loss"], m["lr"], m["grad_norm"], m["tokens"],
                                 m["tokens_per_s"], m["elapsed"], m.get("val_loss"), m.get("reward")])
        if self.checkpoint_every and m["step"] % self.checkpoint_every == 0:
            # a checkpoint follows; a resume starts from it, so the metrics up to it must be in the vault first
            self.flush(wait=60.0)
        self.on_event("step", m)
        if (w := self.watch.feed(m["step"], m.get("loss"), m.get("val_loss"))) is not None:
            self.on_event("warning", {"text": w, "step": m["step"]})
        return self._verdict(m)

    def seed(self, earlier: list[float]) -> None:
        """A resumed run counts its patience from the validation losses measured before the stop."""
        for val in earlier:
            self._improved(val)

    def _improved(self, val: float) -> bool:
        if self.best_val is None or val < self.best_val:
            self.best_val, self.since_best = val, 0
            return True
        self.since_best += 1
        return False

    def _verdict(self, m: dict) -> str | None:
        val = m.get("val_loss")
        if val is None or not self.patience or self._improved(val) or self.since_best < self.patience:
            return None
        self.stopped_early = m["step"]
        self.on_event("stage", {"text": f"early stop at step {m['step']}: validation loss {val:.4f}, best "
                                        f"{self.best_val:.4f}, {self.since_best} measurements without improving"})
        return "finish"

    def checkpoint(self, step: int, path: str) -> None:
        with self.lock:
            self.last_checkpoint = path
        self.flush(wait=60.0)
        self.on_event("checkpoint", {"step": step, "path": path})

    def flush(self, wait: float) -> None:
        with self.flushing:
            self._flush(wait)

    def _flush(self, wait: float) -> None:
        import duckdb

        from appliance.errors import VaultError

        with self.lock:
            rows, ckpt = self.pending, self.last_checkpoint
            self.pending, self.last_checkpoint = [], None
        if not rows and ckpt is None:
            return
        try:
            with self.vault.session(wait=wait) as v, v.transaction() as con:
                if rows:
                    con.executemany("INSERT INTO train_metrics (run, step, loss, lr, grad_norm, tokens, tokens_per_s, "
                                    "elapsed, val_loss, reward) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    con.execute("UPDATE train_runs SET step = ?, updated = ? WHERE id = ?",
                                [rows[-1][1], utcnow(), self.run_id])
                if ckpt is not None:
                    con.execute("UPDATE train_runs SET checkpoint = ?, updated = ? WHERE id = ?",
                                [ckpt, utcnow(), self.run_id])
        except (VaultError, duckdb.Error, OSError):  # busy or failing for now: keep it for the next flush
            with self.lock:
                self.pending = rows + self.pending
                self.last_checkpoint = self.last_checkpoint or ckpt

    @contextmanager
    def live(self):
        """The vault let go for the length of the block, progress written in the background."""
        stop = threading.Event()

        def flusher() -> None:
            while not stop.wait(self.FLUSH_EVERY):
                self.flush(wait=0.5)

        thread = threading.Thread(target=flusher, daemon=True, name="train-recorder")
        try:
            with self.vault.released():
                thread.start()
                try:
                    yield
                finally:
                    stop.set()
                    thread.join()
        finally:
            self.flush(wait=60.0)

    def status(self, status: str, **cols) -> None:
        sets = ", ".join(f"{k} = ?" for k in ("status", "updated", *cols))
        with self.lock, self.vault.session(wait=60.0):
            self.vault.con.execute(f"UPDATE train_runs SET {sets} WHERE id = ?",
                                   [status, utcnow(), *cols.values(), self.run_id])


class _LocalLink:
    def __init__(self, packed: data.Packed, rec: Recorder):
        self.rows, self.step, self.checkpoint = packed.take, rec.step, rec.checkpoint


def less_scrubbed_warning(vault, inputs: list[str]) -> str:
    """One line when a dataset, tokenizer or base this run learns from was re-scrubbed since under a stricter
    policy (`lineage.less_scrubbed`); "" when there is nothing to say."""
    said = [w["message"] for i in dict.fromkeys(inputs) for w in lineage.less_scrubbed(vault.con, i)]
    return f"warning: training on less-scrubbed data: {'; '.join(dict.fromkeys(said))}" if said else ""


def run(vault, recipe: Recipe, resume: bool = False, gpus: int = 0, nodes: launch.Nodes | None = None,
        on_event: Callable[[str, dict], None] = lambda kind, d: None, resume_run: str | None = None) -> RunResult:
    """Train as `recipe` says; on success the model is NAME@K in artifacts/models and in lineage.

    `resume` continues the newest unfinished run of the recipe's name, or exactly `resume_run` when given
    (a job resumes its own run, not another job's of the same name).
    """
    nodes = nodes or launch.Nodes()
    world = max(gpus, 1) * nodes.nnodes
    t = recipe.train
    if t.batch_size % (world * t.micro_batch_size):
        raise UsageError(f"train.batch_size {t.batch_size} does not split into {world} process(es) x micro "
                         f"batches of {t.micro_batch_size}",
                         f"make it a multiple of {world * t.micro_batch_size} or change --gpus")
    _check_devices(gpus)
    src = inputs(vault, recipe)
    tokenizer = load_tokenizer(src.tokenizer_path)
    _check_lengths(recipe, src)
    _check_tokenizer(recipe, tokenizer)
    template = _chat_template(recipe, tokenizer, src, on_event)
    tok_hash = tokenizer_hash(src.tokenizer_path, tokenizer.chat_template if template else "")
    on_event("stage", {"text": "packing rows"})
    packed, datasets, cached = data.prepare(vault, recipe.data, tokenizer, tok_hash,
                                            progress=lambda s: on_event("stage", {"text": s}))
    on_event("data", {**packed.stats, "cached": cached})
    n_val = 0
    if recipe.train.eval_every:  # validation rows go after the train rows, served the same way
        val = data.validation(vault, recipe.data, tokenizer, datasets, tok_hash)
        n_val = val.rows
        packed = data.Packed(np.concatenate([packed.tokens, val.tokens]), np.concatenate([packed.labels, val.labels]),
                             {**packed.stats, "validation_rows": n_val})
    parents = [(d, "data") for d, _ in datasets] + src.parents
    scrub_warning = less_scrubbed_warning(vault, [p for p, _ in parents])
    if scrub_warning:  # trained all the same: the operator decides; the run keeps the warning
        on_event("warning", {"text": scrub_warning, "step": 0})
    resolved = {"datasets": [list(d) for d in datasets], "inputs": [list(p) for p in src.parents]}
    run_id, resume_from = _open_run(vault, recipe, resume, resolved, resume_run)
    resume_step = _step_of(resume_from)  # read now: old checkpoints are pruned as the run goes
    run_dir = vault.home.artifacts / "runs" / run_id
    model_dir = vault.home.artifacts / "models" / run_id
    _drop_stale(vault, run_id, model_dir)
    info = {"id": run_id, "stage": recipe.stage, "method": recipe.method, "recipe": recipe.to_dict(),
            "datasets": [{"version": d, "content_hash": h} for d, h in datasets],
            "parents": [{"id": p, "role": r} for p, r in parents], "code_version": code_version(),
            "data": packed.stats}
    if template:  # the base had none: the appliance's, saved with the model
        info["chat_template"] = template
    if recipe.data.format == "task":  # what the episodes and tools were, exactly
        from appliance.tasks import load as load_task

        t = load_task(recipe.data.task)
        info["task"] = {"name": t.name, "path": t.path, "sha256": t.sha256}
    spec = StageSpec(run_id=run_id, recipe=recipe, rows=packed.rows - n_val, val_rows=n_val,
                     tokenizer_path=Path(src.tokenizer_path), base_path=Path(src.base_path) if src.base_path else None,
                     run_dir=run_dir, model_dir=model_dir, info=info,
                     resume_from=Path(resume_from) if resume_from else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    sealed.write_file(run_dir / "recipe.json", json.dumps(info, indent=2, default=str).encode())
    # grpo's loss is minus an advantage and dpo's falls toward 0 by design: only their validation loss is watched
    watch = LossWatch(collapse=0.0 if recipe.stage in ("dpo", "grpo") else 0.05)
    watch.warnings += [scrub_warning] if scrub_warning else []
    rec = Recorder(vault, run_id, on_event, recipe.train.checkpoint_every, recipe.train.early_stop_patience, watch)
    if resume_step:
        rec.seed([v for (v,) in vault.con.execute(
            "SELECT val_loss FROM train_metrics WHERE run = ? AND step <= ? AND val_loss IS NOT NULL ORDER BY step",
            [run_id, resume_step]).fetchall()])
    rec.status("running", world=world, error=None)
    on_event("start", {"id": run_id, "resume_from": resume_step, "max_steps": recipe.train.max_steps,
                       "world": world})
    try:
        with rec.live():
            out = _fit(vault, recipe, spec, packed, rec, gpus, nodes, world)
    except TrainError as e:
        rec.status("failed", error=e.message)
        raise
    except BaseException as e:
        rec.status("failed", error=type(e).__name__)
        raise
    if out["status"] == "failed":
        rec.status("failed", error=out["error"])
        raise TrainError(out["error"], out.get("hint"))
    if out["status"] == "done" and not out.get("model_path"):  # a worker node: node 0 saves the model
        rec.status("done", error="worker node; the model is saved on node 0")
        return RunResult(run_id, recipe.stage, recipe.method, "done", out["step"], out["loss"], out["tokens"],
                         round(out["seconds"], 2), 0.0, None, None, out["checkpoint"], resume_step, world,
                         packed.stats)
    if out["status"] != "done":
        rec.status("interrupted")
        with vault.transaction():
            vault.audit("train.interrupted", [run_id], {"step": out.get("step")})
        raise TrainInterrupted(f"stopped at step {out.get('step') or '?'} of {recipe.train.max_steps}; "
                               f"checkpoint {out.get('checkpoint') or 'none'}",
                               "continue with `appliance train run ... --resume`")
    if rec.stopped_early is not None and rec.stopped_early < recipe.train.max_steps:
        info["stopped_early"] = rec.stopped_early
    return _finish(vault, recipe, run_id, out, parents, info, packed, world, resume_step, rec)


def _fit(vault, recipe: Recipe, spec: StageSpec, packed: data.Packed, rec: Recorder, gpus: int, nodes: launch.Nodes,
         world: int) -> dict:
    if world > 1:
        threads = int(os.environ["APPLIANCE_TRAIN_THREADS"]) if os.environ.get("APPLIANCE_TRAIN_THREADS") \
            else max(1, (os.cpu_count() or 1) // max(gpus, 1))
        files = run_files(vault, spec)
        try:
            return launch.run_distributed(vault.home.tmp, spec, packed.take, rec.step, rec.checkpoint,
                                          max(gpus, 1), nodes, threads, run_keys(vault, spec), files)
        finally:
            _close_files(files)
    loop.set_threads()
    return STAGES[recipe.stage](spec, _LocalLink(packed, rec), loop.Dist.from_env())


def run_keys(vault, spec: StageSpec) -> sealed.GivenKeys:
    """The keys a run's ranks are handed: of what it writes only (its run directory and its model, keys made here
    and kept in the vault), and which of those artifacts are written with manifests (one missing then fails on the
    ranks too). What it reads is handed over open (`run_files`), never with its key."""
    store = vault.store
    keys = {}
    for path in (spec.run_dir, spec.model_dir):
        artifact = store.artifact(path) if path is not None else None
        if artifact is not None:
            keys[artifact] = store.keys.key(artifact, create=True)
    return sealed.GivenKeys(keys, {a for a in keys if store.keys.manifested(a)})


def run_files(vault, spec: StageSpec) -> dict[str, dict[str, MemFile]]:
    """The sealed artifacts a run's ranks read (its tokenizer and base), opened here, checked and frozen read-only:
    the ranks map these in-memory files and never hold those artifacts' keys, so no rank can write a base or a
    tokenizer that a later run would load. The caller closes them."""
    store, out = vault.store, {}
    try:
        for path in (spec.tokenizer_path, spec.base_path):
            artifact = store.artifact(path) if path is not None else None
            if artifact is not None and artifact not in out and sealed.is_sealed(store.root / artifact):
                out[artifact] = store.hand_over(artifact)
    except BaseException:
        _close_files(out)
        raise
    return out


def _close_files(files: dict[str, dict[str, MemFile]]) -> None:
    for opened in files.values():
        for f in opened.values():
            f.close()


def _finish(vault, recipe, run_id, out, parents, info, packed, world, resume_step, rec) -> RunResult:
    model_dir = Path(out["model_path"])
    tokens, tps = vault.con.execute("SELECT sum(tokens), median(tokens_per_s) FROM train_metrics WHERE run = ?",
                                    [run_id]).fetchone()
    metrics = {"final_loss": out["loss"], "steps": out["step"], "tokens": int(tokens or 0),
               "tokens_per_s": round(tps or 0.0, 1), "padding_fraction": packed.stats["padding_fraction"]}
    vals = [v for (v,) in vault.con.execute("SELECT val_loss FROM train_metrics WHERE run = ? AND val_loss IS NOT "
                                            "NULL ORDER BY step", [run_id]).fetchall()]
    if vals:
        metrics.update(best_val_loss=min(vals), final_val_loss=vals[-1], stopped_early=info.get("stopped_early"))
    if out.get("rewards"):  # grpo: mean reward at the first and last step, and the rewards that failed
        metrics["rewards"] = out["rewards"]
    if rec.watch.warnings:  # over-fitting, as said on stderr during the run
        metrics["warnings"] = rec.watch.warnings
    kind = "adapter" if out.get("adapter") else "model"
    if kind == "adapter":  # the layers adapted, as chosen for the architecture or named by the recipe
        metrics["lora_target_modules"] = sorted(json.loads(sealed.read_bytes(model_dir / "adapter_config.json"))
                                                .get("target_modules") or [])
    attrs = {"stage": recipe.stage, "method": recipe.method, "path": str(model_dir), "recipe": recipe.to_dict(),
             "code_version": info["code_version"], "metrics": metrics, "world": world, "data": packed.stats,
             **({"task": info["task"]} if "task" in info else {}),
             **({"chat_template": info["chat_template"]} if "chat_template" in info else {})}
    merged = None
    with vault.transaction():
        lineage.add_node(vault.con, run_id, kind, parents, content_hash=tree_hash(model_dir), attrs=attrs)
        rec.status("done", model_path=str(model_dir))
        vault.audit("train.run", [run_id, *(p for p, _ in parents)],
                    {"stage": recipe.stage, "method": recipe.method, "steps": out["step"], "loss": out["loss"]})
    if kind == "adapter" and recipe.lora.merge:
        merged = merge(vault, run_id)
    return RunResult(run_id, recipe.stage, recipe.method, "done", out["step"], out["loss"], metrics["tokens"],
                     round(out["seconds"], 2), metrics["tokens_per_s"], str(model_dir), merged, out["checkpoint"],
                     resume_step, world, packed.stats, list(rec.watch.warnings))


def merge(vault, adapter_ref: str) -> str:
    """Base + LoRA adapter -> a plain model directory `NAME-merged@K`, a lineage node of its own."""
    adapter_id = resolve_node(vault.con, adapter_ref, ("adapter",), "adapter")
    node = lineage.node(vault.con, adapter_id)
    (base,) = [p for p, role in lineage.parents(vault.con, adapter_id) if role == "base"]
    art = vault.home.artifacts / "models"
    name, k = adapter_id.rsplit("@", 1)
    merged_id = f"{name}-merged@{k}"
    dest = art / merged_id
    if lineage.exists(vault.con, merged_id):
        raise UsageError(f"{adapter_id} is already merged as {merged_id}", f"use {merged_id}")
    _drop_stale(vault, merged_id, dest)
    merge_adapter(art / base, art / adapter_id, dest, {"id": merged_id, "adapter": adapter_id, "base": base,
                                                         "code_version": code_version()})
    with vault.transaction():
        lineage.add_node(vault.con, merged_id, "model", [(adapter_id, "adapter"), (base, "base")],
                         content_hash=tree_hash(dest), attrs={**node["attrs"], "path": str(dest), "merged": True})
        vault.audit("train.merge", [merged_id, adapter_id, base], {})
    return merged_id


def _drop_stale(vault, node_id: str, path: Path) -> None:
    """A directory with no lineage node is what a crash between saving and recording left: remove it."""
    import shutil

    if path.exists() and not lineage.exists(vault.con, node_id):
        shutil.rmtree(path)


def _check_devices(gpus: int) -> None:
    import torch

    if torch.cuda.is_available() and gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {gpus} but this node has {torch.cuda.device_count()} GPU(s)",
                         f"use --gpus {torch.cuda.device_count()} or fewer")


def _check_tokenizer(recipe: Recipe, tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no end-of-text token", "documents are packed with EOS between them; "
                                                                  "use a tokenizer that defines eos_token")


CHAT_FORMATS = ("chat", "preference", "prompts", "task")


def _chat_template(recipe: Recipe, tokenizer, src: Inputs, on_event) -> str | None:
    """Conversations render with the base's own chat template; a base without one (most base models) gets the
    appliance's ChatML, said once as a stage line; the stages set the same and save it with the model."""
    from appliance.train.bases import ensure_chat_template

    if recipe.data.format not in CHAT_FORMATS or (added := ensure_chat_template(tokenizer)) is None:
        return None
    on_event("stage", {"text": f"{src.parents[0][0]} has no chat template: using the appliance's ({added}); "
                               "it is saved with the model"})
    return added


def _check_lengths(recipe: Recipe, src: Inputs) -> None:
    if src.base_path is None:
        return
    cfg = json.loads(sealed.read_bytes(src.base_path / "config.json"))
    limit = cfg.get("max_position_embeddings")
    if limit and recipe.data.seq_len > limit:
        raise UsageError(f"data.seq_len {recipe.data.seq_len} exceeds the base model's context of {limit}",
                         f"set --data.seq_len {limit} or less")


def _open_run(vault, recipe: Recipe, resume: bool, resolved: dict,
              resume_run: str | None = None) -> tuple[str, Path | None]:
    """A new run NAME@K, or with --resume the newest unfinished run of NAME and its last checkpoint."""
    con = vault.con
    if not resume:
        run_id = lineage.next_id(con, recipe.name)
        now = utcnow()
        with vault.transaction():
            con.execute("INSERT INTO train_runs (id, name, stage, method, status, recipe, data, created, updated, "
                        "step, max_steps) VALUES (?, ?, ?, ?, 'starting', ?, ?, ?, ?, 0, ?)",
                        [run_id, recipe.name, recipe.stage, recipe.method, json.dumps(recipe.to_dict()),
                         json.dumps(resolved), now, now, recipe.train.max_steps])
            vault.audit("train.start", [run_id], {"stage": recipe.stage, "method": recipe.method})
        return run_id, None
    row = con.execute("SELECT id, recipe, data FROM train_runs WHERE name = ? AND status IN ('running', "
                      "'interrupted', 'failed', 'starting')" + (" AND id = ?" if resume_run else "") +
                      " ORDER BY created DESC LIMIT 1", [recipe.name, *([resume_run] if resume_run else [])]
                      ).fetchone()
    if row is None:
        which = resume_run or f"run of {recipe.name}"
        raise UsageError(f"no unfinished {which} to resume", "start one without --resume")
    run_id, old_recipe, old_data = row
    changed = sorted(_diff(_complete(json.loads(old_recipe)), recipe.to_dict()) - RESUME_MAY_CHANGE - RESUME_RESOLVED)
    if changed:
        raise UsageError(f"{run_id} was started with different settings: {', '.join(changed)}",
                         "resume with the same recipe and overrides, or start a new run")
    old = json.loads(old_data)
    if old != resolved:
        was = ", ".join(i for i, _ in old["datasets"] + old["inputs"])
        now = ", ".join(i for i, _ in resolved["datasets"] + resolved["inputs"])
        raise UsageError(f"{run_id} trained on {was}; the recipe now resolves to {now}",
                         "pin the versions it started with (NAME@N)")
    ckpt = checkpoint.latest(vault.home.artifacts / "runs" / run_id / "checkpoints")
    start = checkpoint.read_state(ckpt)["step"] if ckpt else 0
    with vault.transaction():
        con.execute("DELETE FROM train_metrics WHERE run = ? AND step > ?", [run_id, start])
        con.execute("UPDATE train_runs SET max_steps = ?, recipe = ?, step = ? WHERE id = ?",
                    [recipe.train.max_steps, json.dumps(recipe.to_dict()), start, run_id])
        vault.audit("train.resume", [run_id], {"from_step": start})
    return run_id, ckpt


def _complete(recipe: dict) -> dict:
    """A recipe as recorded by an older version, with the sections and keys added since at their defaults
    (a default is what that version did), so a resume compares like with like."""
    from appliance.train.config import from_dict

    lora = recipe.get("lora") or {}
    if lora.get("target_modules") == OLD_LORA_DEFAULT:  # the default before targets were chosen by architecture
        recipe = {**recipe, "lora": {**lora, "target_modules": []}}
    return from_dict(recipe, []).to_dict()


OLD_LORA_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.add(prefix + k)
    return out


def _step_of(path: Path | None) -> int | None:
    return checkpoint.read_state(path)["step"] if path else None


def runs(con, name: str | None = None) -> list[dict]:
    rows = con.execute("SELECT id, stage, method, status, step, max_steps, created, updated, model_path, error "
                       "FROM train_runs" + (" WHERE name = ?" if name else "") + " ORDER BY created",
                       [name] if name else []).fetchall()
    from appliance.db_time import iso

    return [{"id": r[0], "stage": r[1], "method": r[2], "status": r[3], "step": r[4], "max_steps": r[5],
             "created": iso(r[6]), "updated": iso(r[7]), "model_path": r[8], "error": r[9]} for r in rows]


def models(con) -> list[dict]:
    """Models and adapters (trained, merged or imported), oldest first."""
    return [{"id": n["id"], "kind": n["kind"], "created": str(n["created"])[:19],
             **{key: n["attrs"].get(key) for key in ("stage", "method", "path")}}
            for n in lineage.nodes(con, ("model", "adapter"))]


def losses(con, run_id: str) -> list[float]:
    return [r[0] for r in con.execute("SELECT loss FROM train_metrics WHERE run = ? ORDER BY step",
                                      [run_id]).fetchall()]


def metrics(con, run_id: str) -> list[dict]:
    cols = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed", "val_loss", "reward"]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM train_metrics WHERE run = ? ORDER BY step", [run_id])
    return [dict(zip(cols, r)) for r in rows.fetchall()]


def _in_memory(p: Path) -> MemFile:
    """A copy of the plain file `p` in an in-memory file, copied by the kernel (no buffer in this process)."""
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        f = MemFile(p.name, size)
        done = 0
        while done < size:
            n = os.sendfile(f.fd, fd, done, size - done)
            if n == 0:
                f.close()
                raise UsageError(f"{p} shrank while it was imported", "import it again once it is complete")
            done += n
        os.lseek(f.fd, 0, os.SEEK_SET)
        return f
    finally:
        os.close(fd)


def import_model(vault, src: Path, name: str, convert: Callable[[MemDir], dict] | None = None) -> dict:
    """Copy a local transformers model directory into the appliance as NAME@K (no hub, no custom code).

    With `convert`, the directory is made by `convert(staged)` (an in-memory `MemDir`) instead of copied (a GGUF
    dequantized by `quantize.gguf_import`); it returns the source record kept in lineage."""
    from appliance.train.bases import as_sentencepiece, check_model_dir, source_record
    from appliance.vault.ingest import validate_name

    validate_name(name, "model")
    if convert is None:
        config = check_model_dir(src)  # refusals (custom code, pickle weights, ...) come before any copy
        source = source_record(src, config)
    model_id = lineage.next_id(vault.con, name)
    root = vault.home.artifacts / "models"
    try:
        # Staged in memory (a private directory of links to in-memory files under HOME/tmp), checked, its
        # tokenizer rewritten where needed, then sealed into the artifacts: no plaintext copy lands in the home.
        with MemDir(vault.home.tmp) as staged:
            tmp = staged.path
            if convert is None:
                for p in sorted(src.iterdir()):
                    if p.is_file() and not p.name.startswith("."):
                        staged.add(p.name, _in_memory(p))
            else:
                source = convert(staged)
                config = json.loads((tmp / "config.json").read_text())
            load_tokenizer(tmp)  # refuse a directory whose tokenizer does not load offline
            tokenizer_note = as_sentencepiece(tmp, staged.new)
            files = {n: f for n, f in staged.check().items() if os.path.lexists(tmp / n) and f.size}
            digest = sealed.write_dir(root / model_id, files)
    except BaseException as e:
        if isinstance(e, ApplianceError | KeyboardInterrupt):
            raise
        raise UsageError(f"cannot import {src}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                         "it must be a complete local transformers model directory or a model GGUF") from None
    attrs = {"path": str(root / model_id), "source": str(src), "architectures": config.get("architectures"),
             "imported": True, "base": source}
    if tokenizer_note:
        attrs["tokenizer_rewritten"] = tokenizer_note
    with vault.transaction():
        lineage.add_node(vault.con, model_id, "model", [], content_hash=digest, attrs=attrs)
        vault.audit("train.import", [model_id], {"source": str(src), "content_hash": digest,
                                                 "name": source["name"], "revision": source["revision"]})
    return {"id": model_id, "path": str(root / model_id), "content_hash": digest,
            "source_format": source.get("format", "transformers"),
            "architectures": config.get("architectures"), "base": source, "tokenizer_rewritten": tokenizer_note}
