"""Eval throughput: cases per second on GGUF (llama.cpp) vs. transformers, same suite, same model, same run.

    python benchmarks/eval_throughput.py [--steps 20] [--threads 2] [--smoke] [--write docs/BENCHMARKS.md]

The model of `edge_inference.py` (Llama-style 6 x 512, trained briefly in a fresh vault) is exported to
f32, q8_0 and q4_k_m. The suite: the shipped `handbook-checks` cases plus 20 cloze questions cut from
the corpus's held-out text (the default suite of a dataset), cases only, greedy. Each backend runs it
once to warm up, then timed. Answers of the f32 GGUF are compared with transformers' one by one.
--smoke: the smoke model of `edge_inference.py`, 2 cloze questions and no warm-up: a check that it runs, not a
measurement.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import parser, update_section  # noqa: E402
from edge_inference import PASS, SMOKE_STEPS, setup, size_of  # noqa: E402

TYPES = ["f32", "q8_0", "q4_k_m"]
CLOZE, SMOKE_CLOZE = 20, 2


def measure(home: Path, model_id: str, threads: int, cloze_n: int = CLOZE, warm_up: bool = True) -> dict:
    import torch

    from appliance.eval.run import run
    from appliance.eval.suite import Suite, from_dataset, load
    from appliance.home import Home
    from appliance.quantize.stage import quantize
    from appliance.vault import Vault

    torch.set_num_threads(threads)
    shipped = load("handbook-checks")
    out = {}
    with Vault.open(Home(home), PASS) as v:
        cloze = from_dataset(v.con, "bench@1", n=cloze_n)
        suite = Suite("bench", "bench", shipped.cases + cloze.cases, [])
        targets = {"transformers fp32": model_id}
        for t in TYPES:
            targets[f"llama.cpp {t}"] = quantize(v, model_id, t, eval_tokens=256, threads=threads).id
        for label, ref in targets.items():
            if warm_up:
                run(v, suite, ref)
            t0 = time.perf_counter()
            res = run(v, suite, ref)
            secs = time.perf_counter() - t0
            out[label] = {"secs": secs, "cases": res["cases"], "passed": res["passed"],
                          "outputs": [c["output"] for c in res["case_results"]]}
    return out


def report(r: dict, threads: int, shipped: int) -> str:
    import llama_cpp
    import torch

    base = r["transformers fp32"]
    rate = {k: x["cases"] / x["secs"] for k, x in r.items()}
    same = sum(a == b for a, b in zip(base["outputs"], r["llama.cpp f32"]["outputs"]))
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, llama-cpp-python "
             f"{llama_cpp.__version__}, {os.cpu_count()} cores, {threads} thread(s). Model as in the edge "
             f"benchmark; {base['cases']} cases ({shipped} shipped handbook checks + cloze questions), greedy.", "",
             "| backend | cases/s | vs. transformers | passed |", "| --- | ---: | ---: | ---: |"]
    for k, x in r.items():
        lines.append(f"| {k} | {rate[k]:.2f} | {rate[k] / rate['transformers fp32']:.2f}x | "
                     f"{x['passed']}/{x['cases']} |")
    lines += ["", f"**llama.cpp q4_k_m / transformers: {rate['llama.cpp q4_k_m'] / rate['transformers fp32']:.2f}x "
                  f"cases/s**; the f32 GGUF gave the same answer as transformers on {same} of {base['cases']} "
                  "cases."]
    return "\n".join(lines)


def main() -> None:
    from appliance.eval.suite import load

    a = parser(__doc__, steps=20).parse_args()
    if a.smoke:
        a.steps = SMOKE_STEPS
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "APPLIANCE_TRAIN_THREADS": str(a.threads)})
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        home, model_id = setup(Path(tmp), a.steps, size_of(a.smoke))
        r = measure(home, model_id, a.threads, SMOKE_CLOZE if a.smoke else CLOZE, warm_up=not a.smoke)
    body = report(r, a.threads, len(load("handbook-checks").cases))
    print(body)
    if a.write:
        update_section(a.write, "eval_throughput", "Eval throughput (`benchmarks/eval_throughput.py`)", body)


if __name__ == "__main__":
    main()
