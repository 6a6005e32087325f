"""The shipped agentic toy task: completion rate of a tiny model before and after GRPO on the task.

    python benchmarks/agentic_task.py [--threads 2] [--smoke] [--write docs/BENCHMARKS.md]

From nothing, on CPU: the sample handbook, its tokenizer, the tiny dense preset pre-trained 60 steps,
full SFT on the worked episodes of `asset-risk` (samples/tasks/asset-risk-demos.jsonl, 150 steps), then the
`grpo-task` recipe (30 steps, LoRA, 8 plays per episode, 2 episodes per step). Completion is measured
with `appliance eval` (greedy, every episode of the task, tools in the sandbox) on the SFT model and on
the GRPO model; the sampled reward is GRPO's own, first 5 steps against last 5. `appliance demo` runs the
same chain (and its test asserts the gain); this script writes the numbers into docs/BENCHMARKS.md.
--smoke runs the same chain with a handful of steps at each stage (and GRPO groups of 2), and evaluates the
3 validation episodes only: a check that it runs, not a measurement (the model learns nothing in so few steps).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import update_section  # noqa: E402

PASS = "benchmark passphrase"
# steps of pre-training, SFT and GRPO, and GRPO's plays per episode
FULL = {"pretrain": 60, "sft": 150, "grpo": 30, "group": 8}
SMOKE = {"pretrain": 5, "sft": 4, "grpo": 3, "group": 2}  # each above its recipe's warm-up


def suite_task():
    from appliance.tasks import load

    return load("asset-risk")


def main() -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--smoke", action="store_true",
                    help="a few steps per stage: checks in seconds that the chain runs (not a measurement)")
    ap.add_argument("--write", type=Path, help="update this BENCHMARKS.md section")
    a = ap.parse_args()
    n = SMOKE if a.smoke else FULL
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "APPLIANCE_TRAIN_THREADS": str(a.threads)})
    import torch

    torch.set_num_threads(a.threads)
    from appliance.eval.run import run as evaluate
    from appliance.eval.suite import load as load_suite
    from appliance.home import Home
    from appliance.samples import generate
    from appliance.train.config import load_recipe
    from appliance.train.run import metrics, run
    from appliance.train.tokenizer import train_tokenizer
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="agentic-bench-") as work:
        samples = Path(work) / "samples"
        generate(samples)
        with Vault.init(Home(Path(work) / "home"), PASS) as v:
            ingest(v, [samples / "handbook", samples / "documents"], "handbook")
            ingest(v, [samples / "tasks" / "asset-risk-demos.jsonl"], "task-demos", validation_fraction=0.0)
            tok = train_tokenizer(v, "handbook@1").id
            fast = ["train.checkpoint_every=1000"]
            base = run(v, load_recipe("tiny-dense", ["data.datasets=handbook@1", f"data.tokenizer={tok}",
                                                     f"train.max_steps={n['pretrain']}", *fast])).id
            sft = run(v, load_recipe("sft-full", [f"model.base={base}", "name=task-sft", "data.datasets=task-demos@1",
                                                  "data.seq_len=256", f"train.max_steps={n['sft']}",
                                                  "train.batch_size=4", "train.micro_batch_size=4", "train.lr=4e-3",
                                                  "train.min_lr=4e-4", *fast])).id
            suite = load_suite("asset-risk")
            if a.smoke:  # an untrained model plays every turn to its longest: the held-out episodes are enough
                suite.metrics = [replace(m, split="validation") for m in suite.metrics]
            e1 = evaluate(v, suite, sft)
            g = run(v, load_recipe("grpo-task", [f"model.base={sft}", f"train.max_steps={n['grpo']}",
                                                 f"grpo.group_size={n['group']}"]))
            e2 = evaluate(v, suite, g.merged)
            before, after = e1["metrics"]["task_completion"], e2["metrics"]["task_completion"]
            total, played = len(suite_task().episodes), e1["metrics"]["task_completion_episodes"]
            episodes = f"all {total} episodes" if played == total else f"{played} of the {total} episodes"
            held = [i for i, ep in enumerate(suite_task().episodes) if ep.get("split") == "validation"]
            vb, va = (sum(c["passed"] for c in e["case_results"] if int(c["case"].rsplit("#", 1)[1]) in held)
                      for e in (e1, e2))
            rewards = [m["reward"] for m in metrics(v.con, g.id)]
    k = min(5, max(1, len(rewards) // 2))

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    body = (f"Tiny dense model (2 layers x 64), CPU, measured in one run ({time.time() - t0:.0f} s in all). The task: "
            "look an asset up with the `lookup` tool, then say its risk class; 12 episodes (9 train, 3 "
            "validation); success needs a successful lookup and the right class in the answer.\n\n"
            "| measure | after SFT on worked episodes | after GRPO on the task | ratio |\n|---|---|---|---|\n"
            f"| completion rate, greedy, {episodes} (`appliance eval`) | {before:.3f} | {after:.3f} | "
            f"{ratio(after, before)} |\n"
            f"| of which the {len(held)} validation episodes (never trained on) | {vb}/{len(held)} | "
            f"{va}/{len(held)} | |\n"
            f"| mean sampled reward, GRPO's first {k} / last {k} steps | {first:.3f} | {last:.3f} | "
            f"{ratio(last, first)} |\n")
    print(body)
    if a.write:
        update_section(a.write, "agentic_task", "Agentic toy task (`benchmarks/agentic_task.py`)", body)


if __name__ == "__main__":
    main()
