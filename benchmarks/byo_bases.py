"""Bring-your-own bases: each open-weight family from import to a proven GGUF, with llama.cpp's converter beside it.

    python benchmarks/byo_bases.py [--smoke] [--write docs/BENCHMARKS.md]

For each family of `appliance.sample_bases` (Llama 3, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2), a base is built
as the family's releases ship it (architecture, tokenizer shape, bf16 safetensors, no chat template), with
random weights. Where llama.cpp publishes the family's real vocabulary (`ggml-vocab-*.gguf`, extracted by
`make setup`) that vocabulary is used (Llama 3: llama-bpe, Qwen: qwen2); else one is trained on the sample
corpus. Then, in a fresh vault:
  - import (`appliance train import`), q8_0 and q4_k_m export (`appliance quantize`, our writer + llama.cpp's
    quantizer) with the quality report on held-out sample text: tokenizer agreement on records and hard
    strings, perplexity change, top-1 agreement, KL divergence;
  - the q8_0 GGUF imported back (`train import FILE.gguf`): time and its own check against llama.cpp;
  - the baseline, run at the same time on the same model directory: llama.cpp's own converter
    (`convert_hf_to_gguf.py` from the same llama.cpp release, f32). It knows a tokenizer only by the hash of
    its output on a check string, so it refuses vocabularies it has not seen; where it converts, its file
    and ours are compared by llama.cpp itself (max |logit diff| on a probe, tokens of the hard strings) and
    the export times are given as a ratio.
--smoke: 64-wide models with sample-trained vocabularies, q8_0 only: a check that it runs, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import update_section  # noqa: E402

PASS = "benchmark passphrase"
FULL_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
REAL_VOCAB = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
LLAMA_CPP = "0.3.36"


def vocab_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_VOCAB_DIR") or Path.home() / ".cache" / "appliance" / "vocab")


def real_tokenizer(family: str):
    """The family's real vocabulary from llama.cpp's test files, shaped as the release's tokenizer.json."""
    import json

    from transformers import AutoTokenizer

    name = REAL_VOCAB.get(family)
    if not name or not (vocab_dir() / f"ggml-vocab-{name}.gguf").is_file():
        return None
    tok = AutoTokenizer.from_pretrained(str(vocab_dir()), gguf_file=f"ggml-vocab-{name}.gguf")
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        tj = Path(d) / "tokenizer.json"
        spec = json.loads(tj.read_text())
        if name == "llama-bpe":
            spec["model"]["ignore_merges"] = True  # Meta-Llama-3's tokenizer.json
        tj.write_text(json.dumps(spec))
        return AutoTokenizer.from_pretrained(d)


def converter(tmp: Path) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py (and its gguf-py) from the llama-cpp-python sdist `make setup` keeps."""
    sdist = Path.home() / ".cache" / "appliance" / "wheels" / f"llama_cpp_python-{LLAMA_CPP}.tar.gz"
    if not sdist.is_file():
        return None
    root = f"llama_cpp_python-{LLAMA_CPP}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(root) and (
            m.name == root + "convert_hf_to_gguf.py" or m.name.startswith((root + "gguf-py/", root + "conversion/")))]
        for m in members:
            m.name = m.name[len(root):]
        tf.extractall(tmp / "llama.cpp", members=members, filter="data")
    return tmp / "llama.cpp" / "convert_hf_to_gguf.py"


def run_converter(script: Path | None, model_dir: Path, out: Path) -> tuple[float | None, str]:
    if script is None:
        return None, "not available (run `make setup`)"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype", "f32"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")})
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1].replace(str(model_dir), "DIR")
        if "tokenizer.model" in last:
            return None, "refused: needs SentencePiece's tokenizer.model"
        return None, "refused: " + last.split(": ", 1)[-1][:70]
    return secs, "converted"


def same_as_ours(ours: Path, theirs: Path, tok) -> tuple[float, bool]:
    """llama.cpp on both files: max |logit diff| on a probe and whether the hard strings tokenize alike."""
    import numpy as np

    from appliance.quantize import llama, quality

    out = []
    for path in (ours, theirs):
        llm = llama.load(path, n_ctx=128, logits_all=True, threads=1, f32_cache=True)
        ids = llm.tokenize(b"The pump house log: valve V-203 closed at 06:40, pressure 3.5 bar.", add_bos=False)
        llm.eval(ids[:48])
        toks = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in quality.hard_strings(tok).values()]
        out.append((np.asarray(llm.scores[:len(ids[:48])]), toks, ids))
        llm.close()
    (a, ta, ia), (b, tb, ib) = out
    return float(np.abs(a - b).max()) if ia == ib else float("nan"), ta == tb and ia == ib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, q8_0 only: checks that it runs")
    ap.add_argument("--write", type=Path, default=None, help="update this Markdown file's section")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from appliance import api, sealed
    from appliance.home import Home
    from appliance.quantize import gguf_export
    from appliance.quantize.stage import quantize
    from appliance.sample_bases import FAMILIES, build
    from appliance.samples import generate
    from appliance.vault import Vault
    from appliance.vault.ingest import ingest

    types = ["q8_0"] if a.smoke else ["q8_0", "q4_k_m"]
    rows, base_rows = [], []
    with tempfile.TemporaryDirectory(prefix="byo-bases-") as t:
        tmp = Path(t)
        generate(tmp / "samples")
        texts = [p.read_text() for p in sorted((tmp / "samples" / "handbook").rglob("*.md"))]
        script = converter(tmp)
        with Vault.init(Home(tmp / "home"), PASS) as v:
            ingest(v, [tmp / "samples" / "handbook"], "handbook")
            for fam in FAMILIES:
                tok = None if a.smoke else real_tokenizer(fam)
                src = build(fam, tmp / "bases" / fam, texts, vocab_size=512 if a.smoke else 4000,
                            shape=None if a.smoke else FULL_SHAPE, tokenizer=tok)
                t0 = time.perf_counter()
                imp = api.train_import(v, src, fam)
                t_import = time.perf_counter() - t0
                model_dir = Path(imp["path"])
                vocab = f"{REAL_VOCAB[fam]} (real)" if tok is not None else "sample-trained"
                for qt in types:
                    t0 = time.perf_counter()
                    r = quantize(v, imp["id"], qt, eval_ref="handbook@1", eval_tokens=256 if a.smoke else 4096)
                    secs = time.perf_counter() - t0
                    q = r.quality
                    rows.append([fam, vocab, qt, f"{secs:.1f}", f"{r.size / 2**20:.1f}",
                                 f"{q['tokenizer_agreed']}/{q['tokenizer_records']}",
                                 f"{q['tokenizer_hard_agreed']}/{q['tokenizer_hard_strings']}",
                                 f"{q['ppl_delta_pct']:+.2f}%", f"{q['top1_agreement']:.3f}", f"{q['mean_kld']:.5f}"])
                    if qt == "q8_0":  # sealed in the home: brought back as a site would, from a plain copy
                        plain = api.model_export(v, r.id, tmp / f"{fam}-q8_0")
                        gguf = Path(plain["out"]) / next(n for n in plain["files"] if n.endswith(".gguf"))
                        t0 = time.perf_counter()
                        back = api.train_import(v, gguf, f"{fam}-back")
                        t_back = time.perf_counter() - t0
                        g = back["base"]["gguf"]
                # the baseline beside ours, on the same imported directory, same run
                ours = tmp / f"{fam}-ours.gguf"
                with sealed.opened(model_dir) as plain_dir:  # the sealed import, in memory, for both converters
                    t0 = time.perf_counter()
                    gguf_export.write(plain_dir, ours, {"id": imp["id"], "name": model_dir.name})
                    t_ours = time.perf_counter() - t0
                    t_theirs, outcome = run_converter(script, plain_dir, tmp / f"{fam}-llamacpp.gguf")
                    if t_theirs is not None:
                        from transformers import AutoTokenizer

                        diff, same = same_as_ours(ours, tmp / f"{fam}-llamacpp.gguf",
                                                  AutoTokenizer.from_pretrained(str(plain_dir)))
                        outcome += (f": max abs logit diff vs ours {diff:.1e}, tokens "
                                    f"{'identical' if same else 'DIFFER'}")
                base_rows.append([fam, vocab, f"{t_import:.1f}", f"{t_ours:.2f}",
                                  f"{t_theirs:.2f}" if t_theirs else "-",
                                  f"{t_ours / t_theirs:.2f}x" if t_theirs else "-", outcome,
                                  f"{t_back:.1f} s, top-1 {g['top1_agreement']:.3f}"])
                print(f"{fam}: " + " | ".join(base_rows[-1][2:]), file=sys.stderr, flush=True)
    body = _report(rows, base_rows, a.smoke)
    print(body)
    if a.write:
        update_section(a.write, "byo_bases", "Bring-your-own bases (`benchmarks/byo_bases.py`)", body)


def _report(rows: list[list[str]], base_rows: list[list[str]], smoke: bool) -> str:
    import platform

    def table(head: list[str], body: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in body])

    shape = "64 wide, 2 layers" if smoke else "256 wide, 4 layers, 4 heads (2 KV)"
    return (f"{'Smoke run (not a measurement). ' if smoke else ''}Random-weight bases ({shape}) of each family, "
            f"on {platform.machine()} with {os.cpu_count()} cores, one thread; perplexity and agreement on "
            "held-out sample handbook text.\n\n"
            + table(["family", "vocabulary", "type", "export + quantize s", "MiB", "tokenizer (records)",
                     "hard strings", "ppl change", "top-1", "KL"], rows)
            + "\n\nImport, and the f32 export beside llama.cpp's own converter on the same directory "
              "(ratio < 1: ours is faster), and the q8_0 file imported back:\n\n"
            + table(["family", "vocabulary", "import s", "our f32 export s", "llama.cpp converter s", "ratio",
                     "llama.cpp converter", "q8_0 imported back"], base_rows)
            + ("" if smoke else "\n\n" + READ_WITH_CARE))


READ_WITH_CARE = (
    "Read with care: the bases have random weights, so their next-token distributions are nearly flat and "
    "q4_k_m's top-1 agreement says little; the KL divergence is the figure to read. The held-out text is one "
    "record of the sample handbook, so the hard strings (digits, whitespace runs, code, non-Latin scripts, emoji, "
    "special and added tokens in text) carry the tokenizer check. The ratio against llama.cpp's converter is "
    "from the same moment on the same directory. llama.cpp's converter recognises a tokenizer only by the hash of "
    "its output on a check string: it converts the real Llama 3 and Qwen2 vocabularies (and then its file and ours "
    "give the same logits and tokens) and refuses the sample-trained ones, which the appliance exports with every "
    "check passing.")


if __name__ == "__main__":
    main()
