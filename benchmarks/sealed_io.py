"""Sealed I/O against plain I/O: each sealed operation beside its plain baseline, same payload, same run.

    python benchmarks/sealed_io.py [--gib 1] [--repeat 3] [--sections bundle,model,gguf,checkpoint] [--smoke]
                                   [--write docs/BENCHMARKS.md]

Issue 21 asks that sealing is not what a user waits for. One payload of random bytes (`--gib`, in the
page cache for every side) goes through each section, which times the plain way and the sealed way and
reports MB/s of payload for both and their ratio against the aim. Sections (one function each, listed in
SECTIONS, by name; a new one takes the Context and returns a Result):
  - `bundle verify`: `bundle verify` of a plain bundle against the same payload encrypted to one recipient
    (ChaCha20-Poly1305 STREAM: each core reads, opens and hashes its own runs of the digest tree's leaves);
    with it, one core's speed at SHA-256 and at opening chunks, which bound the ratio where the CPU is the
    limit.
  - `model load`: `from_pretrained` of a model saved plain against the same model sealed in a home's artifacts.
  - `GGUF load`: llama.cpp loading an f32 GGUF and evaluating one token, plain file against sealed.
  - `checkpoint save`: a training checkpoint (weights and AdamW moments) plain against sealed as written.
With the two loads, the rate at which this machine fills fresh memory (an in-memory file, on every core):
a plain load maps the page cache and allocates nothing, a sealed one must fill fresh memory with every byte,
so that rate bounds the ratio wherever it is slower than the plain load.
Best of `--repeat`, the two ways taken in turns. `--sections` runs some of them (by the first word of their
name: a machine without llama.cpp leaves out `gguf`). --smoke: one pass over 4 MiB, a check that every section
runs, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import update_section  # noqa: E402


@dataclass
class Context:
    """What every section shares: a scratch directory and one payload file of `size` random bytes."""

    work: Path
    payload: Path
    size: int
    repeat: int


@dataclass
class Result:
    label: str  # the row's name in the report
    plain_s: float  # best time of the plain way
    sealed_s: float  # best time of the sealed way, same payload
    aim: float  # sealed speed / plain speed wanted (issue 21)
    note: str = ""  # what bounds the ratio, measured in the same run
    bytes: int = 0  # bytes the operation moves, when not the payload's size


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_pair(plain: Callable[[], object], sealed: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best times of both ways, taken in turns so that both see the same machine (a shared box's load moves)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, t in ((plain, times[0]), (sealed, times[1])):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return min(times[0]), min(times[1])


def bundle_verify(ctx: Context) -> Result:
    """`bundle verify` of one plain bundle and of the same files encrypted to one recipient."""
    from bundles import container
    from bundles.keys import SecretKey
    from bundles.trust import Trusted, TrustStore

    key, edge = SecretKey.generate("bench"), SecretKey.generate("edge")
    trust = TrustStore([Trusted("bench", key.public, ("model",))])
    plain, enc = ctx.work / "plain.bundle", ctx.work / "encrypted.bundle"
    for out, recips in ((plain, None), (enc, [edge.public])):
        container.create(out, "model", "bench", 1, [("weights.bin", ctx.payload)], key, None, recips)
    try:
        r = Result("bundle verify", *best_pair(lambda: container.verify(plain, trust),
                                               lambda: container.verify(enc, trust, [edge]), ctx.repeat), 0.7)
    finally:
        plain.unlink()
        enc.unlink()
    sha, chacha = one_core_rates(min(ctx.size, 256 << 20), ctx.repeat)
    r.note = (f"On one core here SHA-256 runs at {sha:,.0f} MB/s and opening ChaCha20-Poly1305 at {chacha:,.0f} "
              f"MB/s: where the CPU bounds both, an encrypted verify (open and hash every byte) runs at about "
              f"{chacha / (sha + chacha):.2f}x of a plain one (hash every byte).")
    return r


def one_core_rates(size: int, repeat: int) -> tuple[float, float]:
    """MB/s on one core of the two steps an encrypted verify adds up: SHA-256, and opening 1 MiB chunks."""
    import hashlib

    from bundles import stream

    data = bytearray(os.urandom(max(size, stream.CHUNK)))
    sealed = bytearray(stream.sealed_size(len(data)))
    key = os.urandom(32)
    stream.seal_into(key, data, sealed)
    a, view, s = stream.aead(key), memoryview(data), memoryview(sealed)
    n = stream.chunks(len(data))

    def open_all() -> None:
        for i in range(n):
            a.decrypt_into(stream.nonce(i, i == n - 1), s[i * (stream.CHUNK + stream.TAG):(i + 1) * (
                stream.CHUNK + stream.TAG)], None, view[i * stream.CHUNK:(i + 1) * stream.CHUNK])

    mb = len(data) / 1e6
    return mb / best(lambda: hashlib.sha256(data).digest(), repeat), mb / best(open_all, repeat)


def _llama(size: int, tie: bool = False):
    """A Llama whose fp32 weights are about `size` bytes (random, not trained: only bytes are timed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, vocab = (1024, 32000) if size >= 64 << 20 else (64, 256)
    per_layer = 4 * hidden * hidden + 3 * hidden * int(hidden * 2.75)
    layers = max(1, (size // 4 - 2 * vocab * hidden) // per_layer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=int(layers), num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256, tie_word_embeddings=tie)
    with torch.device("cpu"):
        return LlamaForCausalLM(cfg).eval()


class _Sealed:
    """A throwaway home's artifacts with its own keys, registered like an open vault's."""

    def __init__(self, work: Path):
        from appliance import sealed

        self.root = work / "home" / "artifacts"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root.parent / "keyring.json").write_text("{}")  # a home: its artifacts are sealed
        self.store = sealed.register(sealed.Store(self.root, work / "home" / "tmp", sealed.GivenKeys(
            {f"{k}/bench@1": os.urandom(32) for k in ("models", "gguf", "runs")})))

    def close(self) -> None:
        from appliance import sealed

        sealed.unregister(self.store)


def model_load(ctx: Context) -> Result:
    """`from_pretrained` of one model: its plain directory against its sealed artifact (opened in memory)."""
    import shutil

    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from appliance import sealed
    from appliance.train.model import save_model

    model = _llama(ctx.size)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    s = _Sealed(ctx.work)
    plain, dest = ctx.work / "plain-model", s.root / "models" / "bench@1"
    try:
        save_model(model, tok, plain, {"id": "bench@1"})
        save_model(model, tok, dest, {"id": "bench@1"})
        del model

        def first_token(m) -> None:  # reads every weight: a plain load maps the file and reads it lazily
            with torch.no_grad():
                m(torch.tensor([[0]]))

        def load_plain():
            first_token(AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32))

        def load_sealed():
            with sealed.opened(dest) as d:
                first_token(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32))

        r = Result("model load + first token (from_pretrained)", *best_pair(load_plain, load_sealed, ctx.repeat),
                   0.8)
        r.note = ("Both read from the page cache; the sealed side opens every file into memory first (one pass that "
                  "decrypts on every core), the plain side maps the file and reads it as the first token runs.")
        return r
    finally:
        s.close()
        shutil.rmtree(plain, ignore_errors=True)
        shutil.rmtree(s.root.parent, ignore_errors=True)


def gguf_load(ctx: Context) -> Result:
    """llama.cpp loading one f32 GGUF and evaluating one token (which touches every weight): the plain file
    against the sealed one, decrypted into an anonymous in-memory file."""
    import shutil

    from appliance import sample_bases
    from appliance.quantize import gguf_export, llama

    hidden = 1024 if ctx.size >= 64 << 20 else 64
    layers = max(1, (ctx.size // 4) // (12 * hidden * hidden))
    src = sample_bases.build("llama3", ctx.work / "gguf-src", ["a bench of text for a small vocabulary"] * 40,
                             vocab_size=300, shape=dict(hidden_size=hidden, intermediate_size=hidden * 2,
                                                        num_hidden_layers=int(layers), num_attention_heads=hidden // 64,
                                                        num_key_value_heads=hidden // 64,
                                                        max_position_embeddings=256))
    s = _Sealed(ctx.work)
    plain = ctx.work / "bench.gguf"
    dest = s.root / "gguf" / "bench@1"
    try:
        gguf_export.write(src, plain, {"id": "bench@1"})
        s.store.write_dir(dest, {"bench.gguf": plain})

        def run(path: Path) -> None:
            llm = llama.load(path, n_ctx=64, threads=os.cpu_count() or 1)
            llm.eval([1])
            llm.close()

        r = Result("GGUF load + first token (llama.cpp)",
                   *best_pair(lambda: run(plain), lambda: run(dest / "bench.gguf"), ctx.repeat), 0.8)
        r.note = (f"An f32 GGUF of {plain.stat().st_size / 1e6:,.0f} MB; llama.cpp maps the plain file lazily, so "
                  "the first token, which reads every weight, is in the time of both sides.")
        r.bytes = plain.stat().st_size
        return r
    finally:
        s.close()
        for p in (plain, ctx.work / "gguf-src"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        shutil.rmtree(s.root.parent, ignore_errors=True)


def checkpoint_save(ctx: Context) -> Result:
    """A training checkpoint (weights and both AdamW moments, torch.distributed.checkpoint) written plain
    against sealed as it is written, for a model a third of the payload (the checkpoint is the payload's size)."""
    import shutil

    import torch

    from appliance.train import checkpoint

    model = _llama(ctx.size // 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    s = _Sealed(ctx.work)
    plain_root, sealed_root = ctx.work / "plain-run" / "checkpoints", s.root / "runs" / "bench@1" / "checkpoints"
    steps = iter(range(1, 1000))
    try:
        r = Result("checkpoint save (torch.distributed.checkpoint)", *best_pair(
            lambda: checkpoint.save(plain_root, next(steps), model, opt, {}, True, 1),
            lambda: checkpoint.save(sealed_root, next(steps), model, opt, {}, True, 1), ctx.repeat), 0.8)
        r.bytes = sum(p.stat().st_size for p in checkpoint.latest(plain_root).iterdir())
        r.note = f"A checkpoint of {r.bytes / 1e6:,.0f} MB, fsynced on both sides."
        return r
    finally:
        s.close()
        shutil.rmtree(plain_root.parent, ignore_errors=True)
        shutil.rmtree(s.root.parent, ignore_errors=True)


# each by the name `--sections` calls it, in the order they run
SECTIONS: dict[str, Callable[[Context], Result]] = {"bundle": bundle_verify, "model": model_load, "gguf": gguf_load,
                                                    "checkpoint": checkpoint_save}


def fresh_fill_rate(size: int, repeat: int) -> float:
    """MB/s at which this machine fills fresh memory: an anonymous in-memory file of `size` bytes written with
    zeros 1 MiB at a time on the same threads, and so the same cores, that open sealed chunks into it (ctypes'
    memset runs without the GIL). A sealed open does this and decrypts besides."""
    import ctypes

    from appliance.memfiles import MemFile
    from bundles import stream

    def fill() -> None:
        with MemFile("fill", size) as f, f.map(write=True) as m:
            base = ctypes.addressof(ctypes.c_char.from_buffer(m))  # the map stays open while the threads write
            list(stream.pool().map(lambda at: ctypes.memset(base + at, 0, min(stream.CHUNK, size - at)),
                                   range(0, size, stream.CHUNK)))

    return size / 1e6 / best(fill, repeat)


def _fill_bound(r: Result, size: int, fill: float) -> str:
    plain = (r.bytes or size) / 1e6 / r.plain_s
    said = (f" A sealed load writes every byte into fresh memory, and this machine fills fresh memory (an in-memory "
            f"file written on every core, nothing decrypted) at {fill:,.0f} MB/s")
    if fill >= plain:
        return said + ", faster than the plain load: not what bounds it here."
    return said + (f": filling alone bounds sealed / plain here at about {fill / plain:.2f}x, before a byte is "
                   "decrypted.")


def write_payload(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 << 20)):
            f.write(os.urandom(64 << 20))
        f.write(os.urandom(size % (64 << 20)))


def report(results: list[Result], size: int, repeat: int) -> str:
    import cryptography

    mb = size / 1e6
    amount = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / (1 << 20):g} MiB"
    lines = [f"python {platform.python_version()}, cryptography {cryptography.__version__}, {os.cpu_count()} cores; "
             f"one {amount} payload in the page cache; best of {repeat}.", "",
             "| operation | plain MB/s | sealed MB/s | sealed / plain | aim |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        m = r.bytes / 1e6 if r.bytes else mb
        lines.append(f"| {r.label} | {m / r.plain_s:,.0f} | {m / r.sealed_s:,.0f} | "
                     f"{r.plain_s / r.sealed_s:.2f}x | >= {r.aim:g}x |")
    lines.append("")
    lines += [f"**{r.label}, sealed / plain: {r.plain_s / r.sealed_s:.2f}x** (aim: >= {r.aim:g}x). {r.note}".rstrip()
              for r in results]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"the sections to run, comma-separated (default: all of {', '.join(SECTIONS)})")
    ap.add_argument("--smoke", action="store_true", help="tiny size (4 MiB, one pass): checks that it runs")
    ap.add_argument("--write", type=Path, default=None, help="update this Markdown file's section")
    a = ap.parse_args()
    chosen = [n.strip() for n in a.sections.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        ap.error(f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
                 f"the sections are {', '.join(SECTIONS)}")
    if a.smoke:
        a.gib, a.repeat = 4 / 1024, 1
    size = int(a.gib * (1 << 30))
    with tempfile.TemporaryDirectory(prefix="sealed-io-", dir=os.environ.get("TMPDIR")) as tmp:
        ctx = Context(Path(tmp), Path(tmp) / "weights.bin", size, a.repeat)
        write_payload(ctx.payload, size)
        results = [section(ctx) for name, section in SECTIONS.items() if name in chosen]
        fill = fresh_fill_rate(size, a.repeat)
        for r in results:
            if r.label.startswith(("model load", "GGUF load")):
                r.note += _fill_bound(r, size, fill)
    body = report(results, size, a.repeat)
    print(body)
    if a.write:
        update_section(a.write, "sealed_io", "Sealed I/O against plain (`benchmarks/sealed_io.py`)", body)


if __name__ == "__main__":
    main()
