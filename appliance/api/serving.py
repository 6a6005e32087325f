"""Quantize to GGUF (with its quality report), the GGUFs there are, and inference on one: generate, chat and
an OpenAI-compatible server (these need no vault)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def gguf_open(path: str | Path, n_ctx: int = 0, threads: int = 0):
    """A GGUF loaded by llama.cpp for `generate` and `chat` (`n_ctx` 0: the model's; `threads` 0: all, at
    most 8). Its `metadata` holds the file's keys (`tokenizer.chat_template`, ...)."""
    from appliance.quantize import infer

    return infer.open_model(Path(path), n_ctx, threads)


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
          cors_origins: Sequence[str] = ()) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models) over one GGUF,
    until interrupted; `on_ready(url)` is called once it listens. `name` is the model name clients ask for
    (default: the file's name)."""
    from appliance.quantize import infer

    infer.serve(Path(path), host, port, n_ctx, threads, api_key, name, on_ready=on_ready or (lambda url: None),
                cors_origins=cors_origins)
