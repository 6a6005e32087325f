"""Edge inference: GGUF through llama.cpp against fp32 transformers on CPU, same model, same prompts, same run.

    python benchmarks/edge_inference.py [--steps 30] [--threads 2] [--smoke] [--write docs/BENCHMARKS.md]

A Llama-style model (sized below) is trained briefly on the sample corpus in a fresh vault, then exported
with `appliance quantize` to every type. Measured:
  - generation: greedy, the same prompts (held-out text cut to 32 tokens), 64 new tokens each, end of text
    ignored so every side makes the same number of tokens; tokens/s = new tokens / wall time (prefill
    included) on `--threads` threads. transformers: `generate` with its KV cache, fp32; llama.cpp: one
    token at a time through llama-cpp-python;
  - export (our GGUF writer) and quantize (llama.cpp) time;
  - per type, laid out like llama.cpp's quantize table: file size, bits per weight, perplexity and its
    change against the fp32 source on the validation split, top-1 agreement, KL divergence.
--smoke: f32, q8_0 and q4_k_m (a plain, a block and a k-quant type; tests/test_quantize.py checks every type),
every side, on a 2 x 256 model (the smallest k-quants take) trained 2 steps, with short prompts and
evaluations: a check that it all runs, not a measurement.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import parser, update_section  # noqa: E402

PASS = "benchmark passphrase"
SHAPE = {"model.hidden_size": 512, "model.intermediate_size": 1536, "model.num_layers": 6, "model.num_heads": 8,
         "model.num_kv_heads": 4, "model.tie_embeddings": "false", "data.seq_len": 256, "train.batch_size": 8,
         "train.micro_batch_size": 8, "train.warmup_steps": 3, "train.lr": 2e-3, "train.min_lr": 2e-4,
         "train.checkpoint_every": 100000}
TYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


@dataclass(frozen=True)
class Size:
    """What a run measures on: the model's shape, the GGUF types, the prompts, the perplexity tokens."""

    shape: dict
    types: tuple[str, ...] = tuple(TYPES)
    vocab: int = 4000
    prompts: int = 4
    prompt_tokens: int = 32
    new_tokens: int = 64
    eval_tokens: int = 4096


FULL = Size(SHAPE)
# k-quants work on rows of 256: the smallest model every type accepts
SMOKE = Size({**SHAPE, "model.hidden_size": 256, "model.intermediate_size": 512, "model.num_layers": 2,
              "model.num_heads": 4, "model.num_kv_heads": 2, "data.seq_len": 64, "train.warmup_steps": 1},
             types=("f32", "q8_0", "q4_k_m"), vocab=1000, prompts=2, prompt_tokens=8, new_tokens=8,
             eval_tokens=256)
SMOKE_STEPS = 2


def size_of(smoke: bool) -> Size:
    return SMOKE if smoke else FULL


def setup(work: Path, steps: int, size: Size = FULL):
    from appliance.home import Home
    from appliance.samples import generate
    from appliance.train.config import load_recipe
    from appliance.train.run import run
    from appliance.train.tokenizer import train_tokenizer
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    home = work / "home"
    src = work / "samples"
    generate(src)
    with Vault.init(Home(home), PASS) as v:
        ingest(v, [src / "handbook", src / "documents", src / "mail", src / "kestrel-tools"], "bench",
               validation_fraction=0.1)
        train_tokenizer(v, "bench@1", vocab_size=size.vocab, name="bench-bpe")
        over = [f"{k}={val}" for k, val in size.shape.items()] + [
            f"train.max_steps={steps}", "data.datasets=bench@1", "data.tokenizer=bench-bpe", "name=edge"]
        t0 = time.perf_counter()
        res = run(v, load_recipe("tiny-dense", over))
        print(f"trained {res.id} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return home, res.id


def prompts(v, tok, size: Size) -> list[list[int]]:
    from appliance.vault.versions import iter_records

    out = []
    for rec in iter_records(v.con, "bench@1", split="validation"):
        ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= size.prompt_tokens:
            out.append(ids[:size.prompt_tokens])
        if len(out) == size.prompts:
            break
    if not out:
        raise SystemExit("no held-out record is long enough for a prompt")
    return out


def transformers_speed(model_dir: Path, ps: list[list[int]], new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(torch.tensor([ps[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        for p in ps:
            out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == len(p) + new_tokens
        return new_tokens * len(ps) / (time.perf_counter() - t0)


def llama_speed(path: Path, ps: list[list[int]], threads: int, new_tokens: int) -> float:
    from appliance.quantize import llama

    llm = llama.load(path, n_ctx=256, threads=threads)
    llm.reset()
    llm.eval(ps[0][:8])  # warm-up
    t0 = time.perf_counter()
    for p in ps:
        llm.reset()
        llm.eval(p)
        for _ in range(new_tokens):
            t = llm.sample(top_k=1, temp=0.0)
            llm.eval([t])
    secs = time.perf_counter() - t0
    llm.close()
    return new_tokens * len(ps) / secs


def measure(home: Path, model_id: str, threads: int, size: Size = FULL) -> dict:
    import torch
    from transformers import AutoTokenizer

    from appliance import sealed
    from appliance.home import Home
    from appliance.quantize.stage import quantize
    from appliance.vault import Vault

    torch.set_num_threads(threads)
    rows = {}
    # Artifacts are sealed: the model and the GGUFs are opened in memory while the vault is open (loading is not timed).
    with Vault.open(Home(home), PASS) as v, sealed.opened(home / "artifacts" / "models" / model_id) as model_dir:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        ps = prompts(v, tok, size)
        for t in size.types:
            r = quantize(v, model_id, t, eval_tokens=size.eval_tokens, threads=threads)
            rows[t] = {"size": r.size, "bpw": r.bits_per_weight, "q": r.quality, "secs": r.seconds,
                       "params": r.params, "path": r.path}
        for t in size.types:
            rows[t]["tok_s"] = llama_speed(Path(rows[t]["path"]), ps, threads, size.new_tokens)
        hf_tok_s = transformers_speed(model_dir, ps, size.new_tokens)
    return {"rows": rows, "hf_tok_s": hf_tok_s, "prompts": len(ps)}


def report(r: dict, steps: int, threads: int, size: Size = FULL) -> str:
    import llama_cpp
    import torch

    rows, hf, s = r["rows"], r["hf_tok_s"], size.shape
    q0 = rows["f32"]["q"]
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, llama-cpp-python "
             f"{llama_cpp.__version__}, {os.cpu_count()} cores, {threads} thread(s) per side. Model: Llama-style, "
             f"{s['model.num_layers']} layers x {s['model.hidden_size']} (MLP {s['model.intermediate_size']}, GQA "
             f"{s['model.num_heads']}/{s['model.num_kv_heads']}), vocab {size.vocab}, untied output, "
             f"{rows['f32']['params'] / 1e6:.1f} M "
             f"parameters, trained {steps} steps on the sample corpus. Generation: {r['prompts']} held-out prompts "
             f"of {size.prompt_tokens} tokens, {size.new_tokens} new tokens each, greedy. Perplexity: {q0['tokens']} "
             f"held-out tokens ({q0['eval_data']}, {q0['eval_split']} split) in windows of {q0['window']}.", "",
             f"fp32 transformers (`generate`, KV cache): **{hf:,.1f} tokens/s** (the baseline).", "",
             "| type | size MiB | bits/weight | perplexity | Δ ppl | top-1 | KL div | llama.cpp tok/s | vs. fp32 "
             "transformers | export + quantize s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines.append(f"| source (transformers fp32) | | 32 | {q0['ppl_source']:.3f} | | | | {hf:,.1f} | 1.00x | |")
    for t in size.types:
        x = rows[t]
        q = x["q"]
        secs = x["secs"]["export"] + x["secs"].get("quantize", 0.0)
        lines.append(f"| {t} | {x['size'] / 2**20:.2f} | {x['bpw']:.2f} | {q['ppl_gguf']:.3f} | "
                     f"{q['ppl_delta_pct']:+.2f}% | {q['top1_agreement']:.1%} | {q['mean_kld']:.5f} | "
                     f"{x['tok_s']:,.1f} | {x['tok_s'] / hf:.2f}x | {secs:.2f} |")
    lines += ["", f"**Q4_K_M through llama.cpp / fp32 transformers: {rows['q4_k_m']['tok_s'] / hf:.2f}x; "
                  f"Q8_0: {rows['q8_0']['tok_s'] / hf:.2f}x** (aim: >= 3x)."]
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__)
    a = ap.parse_args()
    size = size_of(a.smoke)
    if a.smoke:
        a.steps = SMOKE_STEPS
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "APPLIANCE_TRAIN_THREADS": str(a.threads)})
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        home, model_id = setup(Path(tmp), a.steps, size)
        r = measure(home, model_id, a.threads, size)
    body = report(r, a.steps, a.threads, size)
    print(body)
    if a.write:
        update_section(a.write, "edge_inference", "Edge inference (`benchmarks/edge_inference.py`)", body)


if __name__ == "__main__":
    main()
