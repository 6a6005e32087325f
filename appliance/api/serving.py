"""Quantize to GGUF (with its quality report), the GGUFs there are, and inference on one: generate, chat and
an OpenAI-compatible server (these need no vault for a GGUF file; a GGUF id of a home is sealed there, and
needs that home's vault for the moment its key is read: `gguf_keys`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def quantize(v, model: str, type: str = "q4_k_m", imatrix: str | None = None, eval: str | None = None,  # noqa: A002
             ppl_bound: float | None = None, eval_tokens: int = 2048, imatrix_tokens: int = 8192,
             threads: int = 0, progress=None) -> dict:
    """Export `model` to GGUF, quantize and measure it; `progress(stage, done, total)` sees it go."""
    from appliance.quantize.stage import quantize as run

    kw = {"progress": progress} if progress else {}
    return run(v, model, type, imatrix, eval, ppl_bound, eval_tokens, imatrix_tokens, threads, **kw).to_json()


def quantize_list(v) -> dict:
    """The GGUF files the vault knows (`appliance quantize --list`)."""
    from appliance.quantize.stage import exported

    return {"gguf": exported(v.con)}


def quantize_types() -> list[str]:
    """The quantization types there are (f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0), widest first."""
    from appliance.quantize.types import TYPES

    return list(TYPES)


def quantize_type(name: str):
    """The quantization type `name` (f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0); a usage error for any other,
    so a bad type is refused before a vault is opened."""
    from appliance.quantize import types

    return types.get(name)


# --- inference on a GGUF: no vault, no passphrase, so it runs on edge devices too ----------------------------
def gguf_locate(model: str, home: str | Path | None = None) -> Path:
    """The GGUF file `model` names: a path, or an id (`NAME@K:q4_k_m`, or the id it had at the site that sent
    it) among the home's artifacts when `home` has them."""
    from appliance.home import Home
    from appliance.quantize import infer

    artifacts = None if home is None else (home if isinstance(home, Home) else Home(Path(home))).artifacts
    return infer.locate(model, artifacts if artifacts is not None and artifacts.is_dir() else None)


def gguf_sealed(path: str | Path) -> bool:
    """Whether `path` (from `gguf_locate`) is a sealed GGUF of a home: loading it needs that home's vault."""
    from appliance import sealed

    p = Path(path)
    return not p.is_file() and sealed.exists(p)


def gguf_home(path: str | Path) -> Path | None:
    """The home whose artifacts hold the GGUF `path` (HOME/artifacts/gguf/ID/FILE), or None."""
    p = Path(path).absolute()
    if len(p.parents) > 3 and p.parents[2].name == "artifacts" and (p.parents[3] / "keyring.json").is_file():
        return p.parents[3]
    return None


def gguf_keys(v, paths: Sequence[str | Path]) -> None:
    """Hold the keys of the sealed GGUFs among `paths` in memory and let go of the database: they then load
    (decrypted into memory only) for as long as `v` is not closed, while other commands use the vault."""
    for p in paths:
        if gguf_sealed(p):
            store = v.store
            store.keys.key(store.artifact(Path(p)))
    v.detach()


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is an appliance bundle file (signed, maybe encrypted), by its first bytes."""
    from bundles.container import ENC_MAGIC, MAGIC

    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(len(ENC_MAGIC))
    except OSError:
        return False
    return head.startswith(MAGIC) or head == ENC_MAGIC


@contextmanager
def gguf_bundle(path: str | Path, identities: Sequence[str | Path] = (), trust: Sequence[str | Path] = (),
                home: str | Path | None = None) -> Iterator[Path]:
    """The GGUF a bundle carries, checked (signature, trust, expiry, every digest) and decrypted into an
    anonymous in-memory file: an edge device runs it without the model ever on its disk in the clear.

    `identities`: secret key files it may be encrypted to (their passphrase from APPLIANCE_KEY_PASSPHRASE
    [_FILE] or a prompt); `trust`: public key files or trust directories of its signer, else `home`'s trust store.
    """
    from appliance.errors import BundleRefused, UsageError, bundle_errors
    from appliance.exchange import trust_dir
    from appliance.home import Home
    from appliance.memfiles import MemFile
    from bundles import container
    from bundles.keys import SecretKey
    from bundles.trust import TrustStore

    got: dict[str, MemFile] = {}
    with bundle_errors():
        ids = [SecretKey.load(Path(p)) for p in identities]
        if trust:
            store = TrustStore.load(*[Path(t) for t in trust])
        elif home is not None and trust_dir(Home(Path(home))).is_dir():
            store = TrustStore.load(trust_dir(Home(Path(home))))
        else:
            raise UsageError(f"no trusted key to check {path} against", "pass --trust SITE.pub (the signer's key)")

        def sink(name: str):  # straight into an in-memory file: the GGUF is held once, never on this disk
            f = got[name] = MemFile(Path(name).name)

            class _Into:
                def write(self, data) -> None:
                    with memoryview(data) as view:
                        at = 0
                        while at < len(view):
                            with view[at:] as rest:
                                at += os.write(f.fd, rest)

                def close(self) -> None:
                    pass

            return _Into()

        def discard() -> None:
            for f in got.values():
                f.close()
            got.clear()

        def decide(m: dict, signer) -> container.Plan:
            if m["kind"] != "gguf":
                raise BundleRefused(f"{path} carries a {m['kind']}, not a GGUF", "pass a GGUF bundle")
            ggufs = [e for e in m["files"] if e["path"].endswith(".gguf")]
            if len(ggufs) != 1:
                raise BundleRefused(f"{path} holds {len(ggufs)} GGUF files", "a GGUF bundle holds exactly one")
            return container.Plan(sink=lambda name: sink(name) if name.endswith(".gguf") else _Drop(),
                                  discard=discard)

        container.verify(Path(path), store, ids, decide=decide)
    (f,) = got.values()
    try:
        yield Path(f.path)
    finally:
        f.close()


class _Drop:
    """A bundle's file that is checked but not kept (the Modelfile and report beside a GGUF)."""

    def write(self, data) -> None:
        pass

    def close(self) -> None:
        pass


def gguf_open(path: str | Path, n_ctx: int = 0, threads: int = 0, n_gpu_layers: int | None = None):
    """A GGUF loaded by llama.cpp for `generate` and `chat` (`n_ctx` 0: the model's; `threads` 0: all, at
    most 8; `n_gpu_layers` None: all on a CUDA build, none otherwise). Its `metadata` holds the file's keys
    (`tokenizer.chat_template`, ...)."""
    from appliance.quantize import infer

    return infer.open_model(Path(path), n_ctx, threads, n_gpu_layers=n_gpu_layers)


def generate(llm, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
             seed: int | None = None) -> Iterator[str]:
    """Complete `prompt` with a model from `gguf_open`, piece by piece as it is generated."""
    from appliance.quantize import infer

    return infer.generate(llm, prompt, max_tokens, temperature, top_p, seed)


def chat(llm, read: Callable[[str], str], write: Callable[[str], None], system: str = "", max_tokens: int = 256,
         temperature: float = 0.7, seed: int | None = None) -> list[str]:
    """A conversation with a chat model from `gguf_open`: `read(prompt)` gives the user's lines (EOFError or
    /exit ends it, /reset forgets), `write(text)` sees the replies stream, and a whitespace-only reply is
    named ("(blank answer: 3 newlines)"). Returns the replies."""
    from appliance.api.format import blank_note
    from appliance.quantize import infer

    return infer.chat_loop(llm, read, write, system, max_tokens, temperature, seed, blank_note=blank_note)


def serve_exposure(host: str, cors_origins: Sequence[str] = ()):
    """What `serve` would open, and to whom (`host`, `api_key` from APPLIANCE_API_KEY[_FILE], `cors_origins`),
    checked before any model loads: anything but loopback needs an API key; origins are exact, never `*`."""
    from appliance.quantize import infer

    return infer.serve_exposure(host, cors_origins)


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, n_ctx: int = 0, threads: int = 0,
          api_key: str | None = None, name: str | None = None, on_ready: Callable[[str], None] | None = None,
          cors_origins: Sequence[str] = (), n_gpu_layers: int | None = None) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models) over one GGUF,
    until interrupted; `on_ready(url)` is called once it listens. `name` is the model name clients ask for
    (default: the file's name)."""
    from appliance.quantize import infer

    infer.serve(Path(path), host, port, n_ctx, threads, api_key, name, on_ready=on_ready or (lambda url: None),
                cors_origins=cors_origins, n_gpu_layers=n_gpu_layers)
