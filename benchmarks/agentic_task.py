"""The shipped agentic toy task: completion rate of a tiny model before and after GRPO on the task.

    python benchmarks/agentic_task.py [--write docs/BENCHMARKS.md]

From nothing, on CPU: the sample handbook, its tokenizer, the tiny dense preset pre-trained 60 steps,
full SFT on the worked episodes of `asset-risk` (samples/tasks/asset-risk-demos.jsonl, 150 steps), then the
`grpo-task` recipe (30 steps, LoRA, 8 plays per episode, 2 episodes per step). Completion is measured
with `appliance eval` (greedy, every episode of the task, tools in the sandbox) on the SFT model and on
the GRPO model; the sampled reward is GRPO's own, first 5 steps against last 5. `appliance demo` runs the
same chain (and its test asserts the gain); this script writes the numbers into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import update_section  # noqa: E402

PASS = "benchmark passphrase"


def suite_task():
    from appliance.eval.tasks import load

    return load("asset-risk")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="update this BENCHMARKS.md section")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
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
    with tempfile.TemporaryDirectory() as work:
        samples = Path(work) / "samples"
        generate(samples)
        with Vault.init(Home(Path(work) / "home"), PASS) as v:
            ingest(v, [samples / "handbook", samples / "documents"], "handbook")
            ingest(v, [samples / "tasks" / "asset-risk-demos.jsonl"], "task-demos", validation_fraction=0.0)
            tok = train_tokenizer(v, "handbook@1").id
            fast = ["train.checkpoint_every=1000"]
            base = run(v, load_recipe("tiny-dense", ["data.datasets=handbook@1", f"data.tokenizer={tok}",
                                                     "train.max_steps=60", *fast])).id
            sft = run(v, load_recipe("sft-full", [f"model.base={base}", "name=task-sft", "data.datasets=task-demos@1",
                                                  "data.seq_len=256", "train.max_steps=150", "train.batch_size=4",
                                                  "train.micro_batch_size=4", "train.lr=4e-3", "train.min_lr=4e-4",
                                                  *fast])).id
            suite = load_suite("asset-risk")
            e1 = evaluate(v, suite, sft)
            g = run(v, load_recipe("grpo-task", [f"model.base={sft}"]))
            e2 = evaluate(v, suite, g.merged)
            before, after = e1["metrics"]["task_completion"], e2["metrics"]["task_completion"]
            held = [i for i, ep in enumerate(suite_task().episodes) if ep.get("split") == "validation"]
            vb, va = (sum(c["passed"] for c in e["case_results"] if int(c["case"].rsplit("#", 1)[1]) in held)
                      for e in (e1, e2))
            rewards = [m["reward"] for m in metrics(v.con, g.id)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    body = (f"Tiny dense model (2 layers x 64), CPU, measured in one run ({time.time() - t0:.0f} s in all). The task: "
            "look an asset up with the `lookup` tool, then say its risk class; 12 episodes (9 train, 3 "
            "validation); success needs a successful lookup and the right class in the answer.\n\n"
            "| measure | after SFT on worked episodes | after GRPO on the task | ratio |\n|---|---|---|---|\n"
            f"| completion rate, greedy, all 12 episodes (`appliance eval`) | {before:.3f} | {after:.3f} | "
            f"{after / before if before else float('inf'):.2f}x |\n"
            f"| of which the {len(held)} validation episodes (never trained on) | {vb}/{len(held)} | "
            f"{va}/{len(held)} | |\n"
            f"| mean sampled reward, GRPO's first 5 / last 5 steps | {first:.3f} | {last:.3f} | "
            f"{last / first if first else float('inf'):.2f}x |\n")
    print(body)
    if a.write:
        update_section(a.write, "agentic_task", "Agentic toy task (`benchmarks/agentic_task.py`)", body)


if __name__ == "__main__":
    main()
