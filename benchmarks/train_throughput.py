"""Pre-training throughput: `appliance train run` against the transformers `Trainer`, same run, same box.

    python benchmarks/train_throughput.py [--steps 30] [--threads 2] [--smoke] [--write docs/BENCHMARKS.md]

Same model (a Llama-style preset sized below), same tokenizer and vault data, same sequence length,
global batch, learning-rate schedule, optimizer and thread count. Each side runs in a child process of
its own so its peak RSS is its own. Three rows:
  appliance       `appliance train run` (packed rows from the vault, the shared loop)
  Trainer/packed  `Trainer` fed the very same packed rows (isolates the loop from the data path)
  Trainer/padded  `Trainer` the way most fine-tuning scripts feed it: one document per row, truncated
                  and padded to the sequence length (`padding="max_length"`), pad tokens masked
Throughput is the median over steady-state steps (the first 3 are dropped) of tokens per second, both
raw (every position, padding included) and useful (positions that carry a document token).
--smoke runs the same three sides on a 2 x 64 model for 4 steps: a check that they run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import parser, update_section  # noqa: E402

PASS = "benchmark passphrase"
SHAPE = {"model.hidden_size": 256, "model.intermediate_size": 768, "model.num_layers": 4, "model.num_heads": 4,
         "model.num_kv_heads": 2, "data.seq_len": 256, "train.batch_size": 8, "train.micro_batch_size": 8,
         "train.warmup_steps": 2, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.checkpoint_every": 100000}
VOCAB = 4000
# --smoke: the tiny-dense preset's own sizes, short rows, small batches
SMOKE_SHAPE = {**SHAPE, "model.hidden_size": 64, "model.intermediate_size": 192, "model.num_layers": 2,
               "data.seq_len": 64, "train.batch_size": 4, "train.micro_batch_size": 4}
SMOKE_VOCAB, SMOKE_STEPS = 1000, 4  # the fewest steps that leave one after the 3 dropped


def shape(smoke: bool) -> dict:
    return SMOKE_SHAPE if smoke else SHAPE


def setup(work: Path, vocab: int) -> Path:
    from appliance.home import Home
    from appliance.samples import generate
    from appliance.train.tokenizer import train_tokenizer
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    home = work / "home"
    src = work / "samples"
    generate(src)
    with Vault.init(Home(home), PASS) as v:
        ingest(v, [src / "handbook", src / "documents", src / "mail", src / "kestrel-tools"], "bench")
        train_tokenizer(v, "bench@1", vocab_size=vocab, name="bench-bpe")
    return home


def overrides(steps: int, smoke: bool = False) -> list[str]:
    return [f"{k}={v}" for k, v in shape(smoke).items()] + [f"train.max_steps={steps}", "data.datasets=bench@1",
                                                     "data.tokenizer=bench-bpe", "name=bench"]


def child(cmd: list[str], env: dict) -> tuple[str, float]:
    """Run a child; return its stdout and its own peak RSS in MB."""
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read()
        if p.returncode:
            raise SystemExit(f"child failed ({p.returncode}): {err[-2000:]}")
        out.seek(0)
        return out.read(), usage.ru_maxrss / 1024


def run_metrics(home: Path, run_id: str) -> list[dict]:
    """A run's per-step metrics, read here (not in a child: another interpreter start costs more than the run)."""
    from appliance.home import Home
    from appliance.train.run import metrics
    from appliance.vault import Vault

    with Vault.open(Home(home), PASS, read_only=True) as v:
        return metrics(v.con, run_id)


def appliance_side(home: Path, steps: int, env: dict, smoke: bool = False) -> dict:
    args = [x for o in overrides(steps, smoke) for x in ("--set", o)]
    out, rss = child([sys.executable, "-m", "appliance", "--home", str(home), "--json", "train", "run",
                      "tiny-dense", *args], env)
    res = json.loads(out)
    metrics = run_metrics(home, res["id"])
    tps = sorted(m["tokens_per_s"] for m in metrics[3:])
    pad = res["data"]["padding_fraction"]
    raw = tps[len(tps) // 2]
    mean_loss = sum(m["loss"] for m in metrics) / len(metrics)
    return {"raw": raw, "useful": raw * (1 - pad), "padding": pad, "rss": rss, "loss": mean_loss}


def trainer_child(home: Path, steps: int, mode: str, threads: int, smoke: bool = False) -> None:
    """Runs inside a child: the Trainer on packed or padded rows read from the vault (in memory only)."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(threads)
    from appliance.home import Home
    from appliance.train import data
    from appliance.train.config import load_recipe
    from appliance.train.model import load_tokenizer, new_model
    from appliance.vault import Vault
    from appliance.vault.versions import iter_records

    recipe = load_recipe("tiny-dense", overrides(steps, smoke))
    L = recipe.data.seq_len
    with Vault.open(Home(home), PASS) as v:
        tok = load_tokenizer(home / "artifacts" / "tokenizers" / "bench-bpe@1")  # sealed: read with the vault open
        if mode == "packed":
            packed, _, _ = data.prepare(v, recipe.data, tok, "bench")
            rows = [(t, lab) for t, lab in zip(packed.tokens.astype(np.int64), packed.labels.astype(np.int64))]
        else:
            texts = [r["text"] for r in iter_records(v.con, "bench@1", split="train")]
            enc = tok(texts, max_length=L, truncation=True, padding="max_length")["input_ids"]
            rows = []
            for ids in enc:
                ids = np.asarray(ids, np.int64)
                lab = ids.copy()
                lab[ids == tok.pad_token_id] = -100
                rows.append((ids, lab))
    useful = float(np.mean([(lab != -100).mean() for _, lab in rows]))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": torch.from_numpy(rows[i][0]), "labels": torch.from_numpy(rows[i][1])}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    t = recipe.train
    args = TrainingArguments(output_dir=str(home / "tmp" / f"trainer-{mode}"), per_device_train_batch_size=t.batch_size,
                             max_steps=steps, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1,
                             adam_beta2=t.beta2, max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps,
                             lr_scheduler_type="cosine", logging_steps=10 ** 6, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=t.seed)
    model = new_model(recipe.model, tok, t.seed)
    start = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
    out = trainer.train()
    steps_dt = np.diff([start, *times])[3:]
    raw = t.batch_size * L / float(np.median(steps_dt))
    print(json.dumps({"raw": raw, "useful": raw * useful, "padding": 1 - useful, "loss": out.training_loss}))


def trainer_side(home: Path, steps: int, mode: str, threads: int, env: dict, smoke: bool = False) -> dict:
    out, rss = child([sys.executable, __file__, "--trainer-child", mode, "--home", str(home), "--steps", str(steps),
                      "--threads", str(threads), *(["--smoke"] if smoke else [])], env)
    return {**json.loads(out.strip().splitlines()[-1]), "rss": rss}


def report(r: dict, steps: int, threads: int, smoke: bool = False) -> str:
    import torch

    a, s = r["appliance"], shape(smoke)
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cores, "
             f"{threads} thread(s) per side, CPU fp32. Model: Llama-style, {s['model.num_layers']} layers x "
             f"{s['model.hidden_size']} (MLP {s['model.intermediate_size']}, GQA {s['model.num_heads']}/"
             f"{s['model.num_kv_heads']}), vocab {SMOKE_VOCAB if smoke else VOCAB}; sequence {s['data.seq_len']}, "
             f"global batch {s['train.batch_size']}, {steps} steps (median of steps 4..{steps}). Data: the "
             "sample handbook, documents, mail and code in the vault.", "",
             "| trainer | raw tok/s | useful tok/s | padding | peak RSS MB | mean loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, key in (("appliance `train run`", "appliance"), ("`Trainer`, same packed rows", "packed"),
                      ("`Trainer`, one padded document per row", "padded")):
        x = r[key]
        lines.append(f"| {name} | {x['raw']:,.0f} | {x['useful']:,.0f} | {x['padding']:.1%} | {x['rss']:.0f} | "
                     f"{x['loss']:.3f} |")
    lines += ["", f"**appliance / Trainer (packed), raw tokens/s: {a['raw'] / r['packed']['raw']:.2f}x**; "
                  f"useful tokens/s against the padded Trainer: "
                  f"**{a['useful'] / r['padded']['useful']:.2f}x** (aim: >= 1.3x)."]
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--trainer-child", choices=["packed", "padded"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "APPLIANCE_PASSPHRASE": PASS,
                       "TRANSFORMERS_VERBOSITY": "error"})
    if a.trainer_child:
        trainer_child(a.home, a.steps, a.trainer_child, a.threads, a.smoke)
        return
    if a.smoke:
        a.steps = SMOKE_STEPS
    if a.steps < 4:
        ap.error("--steps must be at least 4 (the first 3 are dropped)")
    env = {**os.environ, "APPLIANCE_TRAIN_THREADS": str(a.threads), "PYTHONPATH": str(Path(__file__).parents[1])}
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        home = setup(Path(tmp), SMOKE_VOCAB if a.smoke else VOCAB)
        r = {"appliance": appliance_side(home, a.steps, env, a.smoke),
             "packed": trainer_side(home, a.steps, "packed", a.threads, env, a.smoke),
             "padded": trainer_side(home, a.steps, "padded", a.threads, env, a.smoke)}
    body = report(r, a.steps, a.threads, a.smoke)
    print(body)
    if a.write:
        update_section(a.write, "train_throughput", "Training throughput (`benchmarks/train_throughput.py`)", body)


if __name__ == "__main__":
    main()
