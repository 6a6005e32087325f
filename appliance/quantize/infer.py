"""Inference on a GGUF through llama.cpp: one completion, an interactive chat, an OpenAI-compatible server.

Needs no vault, no torch and no passphrase: the same commands run on an edge device that holds only the
GGUF. A GGUF is named by its path, or by its id (`tiny-dense@1:q4_k_m`) when the appliance home has it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance import sealed
from appliance.errors import UsageError
from appliance.quantize import llama
from appliance.quantize.types import QuantizeError


def locate(ref: str, artifacts: Path | None) -> Path:
    """A GGUF file path, or a GGUF id resolved under the home's artifacts."""
    p = Path(ref).expanduser()
    if p.is_file() or ref.endswith(".gguf") or os.sep in ref:
        return p
    if artifacts is not None:
        from appliance.quantize.stage import gguf_dir

        d = gguf_dir(artifacts, ref)
        cand = d / f"{d.name}.gguf"
        if sealed.exists(cand):
            return cand
        found = _ggufs(d)  # an imported bundle keeps its file's name
        if len(found) == 1:
            return found[0]
        if (p := _by_sender_id(artifacts / "gguf", ref)) is not None:
            return p
    raise QuantizeError(f"no GGUF {ref}", "pass a .gguf path, or an id listed by `appliance quantize --list`")


def _by_sender_id(root: Path, ref: str) -> Path | None:
    """An imported GGUF under the id it had at the site that sent it, as `lineage` accepts it: from the index
    the importer keeps (artifacts/gguf/.senders.json, written from validated ids, never a bundle's file), and
    only while this site has no GGUF of that NAME of its own."""
    from appliance.vault.lineage import SENDERS_INDEX, sender_id

    if sender_id(ref) is None or not root.is_dir():
        return None
    name = ref.split("@", 1)[0]
    if any(d.name.startswith(name + "@") for d in root.iterdir() if d.is_dir()):
        return None  # this site's own NAME@K: a sender's id never stands in for them
    try:
        local = json.loads((root / SENDERS_INDEX).read_text(encoding="utf-8")).get(ref)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(local, str) or Path(local).name != local or local.startswith("."):
        return None
    found = _ggufs(root / local)
    return found[0] if len(found) == 1 else None


def _ggufs(d: Path) -> list[Path]:
    """The GGUF files of an artifact directory, by their plaintext names (sealed or not)."""
    if not d.is_dir():
        return []
    return sorted({p.with_name(p.name.removesuffix(sealed.SUFFIX)) for p in d.iterdir()
                   if p.name.endswith((".gguf", ".gguf" + sealed.SUFFIX))})


def open_model(path: Path, n_ctx: int = 0, threads: int = 0, seed: int = 0, n_gpu_layers: int | None = None):
    """A GGUF for generate, chat and eval: offloaded to the GPU as `gpu_layers` says (all on a CUDA build)."""
    return llama.load(path, n_ctx=n_ctx, threads=threads, seed=seed, n_gpu_layers=gpu_layers(n_gpu_layers))


def generate(llm, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
             seed: int | None = None) -> Iterator[str]:
    """Stream the completion of `prompt`, piece by piece; stops at end of text or `max_tokens`."""
    llm.set_seed(_seed(seed))
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       stream=True):
        yield chunk["choices"][0]["text"]


def chat_turn(llm, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7,
              seed: int | None = None) -> Iterator[str]:
    """Stream the assistant's reply to `messages` (rendered with the GGUF's own chat template)."""
    if not llm.metadata.get("tokenizer.chat_template"):
        raise QuantizeError("this GGUF has no chat template", "use `appliance generate` for plain completion")
    llm.set_seed(_seed(seed))
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=temperature,
                                            stream=True):
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            yield delta["content"]


def _seed(seed: int | None) -> int:
    """A given seed repeats a sample; without one, every call samples afresh."""
    import secrets

    return secrets.randbelow(2**31) if seed is None else seed


def chat_loop(llm, read: Callable[[str], str], write: Callable[[str], None], system: str = "",
              max_tokens: int = 256, temperature: float = 0.7, seed: int | None = None,
              blank_note: Callable[[str], str | None] | None = None) -> list[str]:
    """A terminal conversation: /reset forgets, /exit or end of input leaves. Returns the replies.

    `blank_note(reply)` words a reply that is only whitespace (written after it, so the operator does not
    see an empty turn and no reason); without it such a reply is left as it is."""
    messages = [{"role": "system", "content": system}] if system else []
    replies: list[str] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return replies
        text = line.strip()
        if text in ("/exit", "/quit"):
            return replies
        if text == "/reset":
            messages = messages[:1] if system else []
            write("(conversation cleared)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        write("model> ")
        reply = "".join(_echo(chat_turn(llm, messages, max_tokens, temperature, seed), write))
        write("\n")
        if blank_note is not None and not reply.strip():  # whitespace only: say so
            write(f"{blank_note(reply)}\n")
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
        if seed is not None:
            seed += 1  # repeatable, but not the same draw for every turn


def _echo(pieces: Iterator[str], write: Callable[[str], None]) -> Iterator[str]:
    for p in pieces:
        write(p)
        yield p


def gpu_layers(requested: int | None = None, offload: bool | None = None) -> int:
    """Layers llama.cpp puts on the GPU: `requested` (-1: all), or by default all when llama.cpp was built with
    CUDA (`make setup` on a box with a GPU) and none otherwise. `offload`: whether this build can offload
    (None: ask llama.cpp)."""
    if requested is not None:
        return requested
    if offload is None:
        try:
            import llama_cpp

            offload = bool(llama_cpp.llama_supports_gpu_offload())
        except (ImportError, AttributeError, OSError):
            offload = False
    return -1 if offload else 0


def serve(path: Path, host: str, port: int, n_ctx: int = 0, threads: int = 0, api_key: str | None = None,
          alias: str | None = None, on_ready: Callable[[str], None] = lambda url: None,
          cors_origins: Sequence[str] = (), n_gpu_layers: int | None = None) -> None:
    """llama-cpp-python's OpenAI-compatible server over one GGUF, until interrupted.

    No CORS headers are sent unless `cors_origins` names exact origins (`https://app.example:8443`): a
    browser then lets pages of those origins, and only those, read the answers. The API key, when set, is
    compared in constant time; a host other than loopback is refused without one (`serve_exposure` decides
    all three from the command line and the environment). `n_gpu_layers`: layers offloaded to the GPU
    (`gpu_layers`: by default all on a CUDA build of llama.cpp, none on a CPU one).
    """
    origins = cors_allowed(cors_origins)  # before minutes of loading a large model
    _refuse_open_without_key(host, api_key)
    info = llama.check(path)
    llama.lib()
    os.environ.pop("CONFIG_FILE", None)  # llama_cpp's create_app would replace our settings (the API key too)
    try:
        import uvicorn  # noqa: F401 - here: the server packages are checked before a model loads
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise QuantizeError("the server's packages are not installed", "run `make setup`") from e
    _check_port(host, port)  # before minutes of loading a large model
    n_ctx = n_ctx or int(info["fields"].get("context_length") or 2048)
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    settings = ServerSettings(host=host, port=port, api_key=api_key)
    try:
        with sealed.opened(path) as p:  # a sealed GGUF: loaded from memory, which llama.cpp keeps mapped
            model = ModelSettings(model=str(p), model_alias=alias or path.stem, n_ctx=n_ctx, n_threads=threads,
                                  n_threads_batch=threads, n_gpu_layers=gpu_layers(n_gpu_layers), verbose=False)
            app = create_app(server_settings=settings, model_settings=[model])
    except (ValueError, RuntimeError) as e:
        raise QuantizeError(f"llama.cpp could not load {path}: {e}", "check the file with `appliance generate`"
                            ) from e
    _harden(app, api_key, origins)
    run_server(app, host, port, on_ready, cleanup=_free_models)


def run_server(app, host: str, port: int, on_ready: Callable[[str], None] = lambda url: None,
               stop: threading.Event | None = None, cleanup: Callable[[], None] = lambda: None) -> None:
    """Serve the ASGI `app` with uvicorn until Ctrl-C, or until `stop` (a threading.Event) is set.

    `on_ready(url)` is called once the socket listens; `cleanup()` runs afterwards whatever happened (free
    the models there, while llama.cpp is still loaded). The one start/stop of every server the appliance runs.

    Raises:
        QuantizeError: nothing could listen on `host:port`.
    """
    try:
        import uvicorn
    except ImportError as e:
        raise QuantizeError("the server's packages are not installed", "run `make setup`") from e
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    url = f"http://{host}:{port}/v1"
    original = server.startup

    async def startup(sockets=None):
        await original(sockets)
        if server.started:
            if stop is not None:
                threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)),
                                 daemon=True).start()
            on_ready(url)

    server.startup = startup  # type: ignore[method-assign]
    try:
        server.run()
    except SystemExit:  # uvicorn exits the process when it cannot bind or start
        if server.started:
            raise
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught after a clean shutdown
        if not server.started:
            raise
    finally:
        cleanup()
    if not server.started:
        raise QuantizeError(f"could not listen on {host}:{port}", "is the port in use? pass another --port")


@dataclass(frozen=True)
class Exposure:
    """What `serve` opens, and to whom: decided by `serve_exposure` before any model loads."""

    host: str
    """The address to listen on; anything but loopback has an API key."""
    api_key: str | None
    """The key clients send as a Bearer token; None: no key (loopback only)."""
    cors_origins: list[str]
    """The exact origins whose web pages may read the answers; empty: no CORS headers at all."""


def serve_exposure(host: str, cors_origins: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Exposure:
    """The serve exposure policy: which origins, which key, and whether `host` may be listened on.

    The key comes from APPLIANCE_API_KEY_FILE, then APPLIANCE_API_KEY (`env`, default the process's), never
    a flag, which other users could read in the process list. Without a key only loopback is served. CORS
    origins must each be one exact `scheme://host[:port]` (`cors_allowed`).

    Raises:
        UsageError: a `*` or malformed origin, an unreadable or empty key file, or a non-loopback `host`
            without a key.
    """
    try:
        origins = cors_allowed(cors_origins)
    except QuantizeError as e:
        raise UsageError(e.message, e.hint) from None
    key = api_key_from_env(env)
    _refuse_open_without_key(host, key)
    return Exposure(host, key, origins)


def api_key_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The server's API key from APPLIANCE_API_KEY_FILE, then APPLIANCE_API_KEY; None when neither is set."""
    env = os.environ if env is None else env
    if f := env.get("APPLIANCE_API_KEY_FILE"):
        try:
            key = open(f).read().strip()
        except OSError as e:
            raise UsageError(f"cannot read APPLIANCE_API_KEY_FILE {f}: {e.strerror}", "check the path") from e
        if not key:
            raise UsageError(f"APPLIANCE_API_KEY_FILE {f} is empty", "put the key in it")
        return key
    return env.get("APPLIANCE_API_KEY") or None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) reaches this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_open_without_key(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} would expose the model to the network without an API key",
                         "set APPLIANCE_API_KEY_FILE (or APPLIANCE_API_KEY), or keep the default 127.0.0.1")


def cors_allowed(origins: Sequence[str]) -> list[str]:
    """The origins given, each checked to be one exact `scheme://host[:port]`; `*` and patterns are refused."""
    from urllib.parse import urlsplit

    allowed = []
    for origin in origins:
        if "*" in origin:
            raise QuantizeError(f"--cors-origin {origin} would let any web page read the model's answers",
                                "name each origin exactly, e.g. --cors-origin http://localhost:3000")
        try:
            u = urlsplit(origin)
            port = u.port
        except ValueError:
            u, port = None, None
        host = u.hostname if u else None
        canonical = ""
        if u and u.scheme in ("http", "https") and host and not (u.username or u.password or u.query or u.fragment):
            canonical = f"{u.scheme}://{f'[{host}]' if ':' in host else host}{f':{port}' if port else ''}"
        if origin != canonical:
            example = canonical or "http://localhost:3000"
            raise QuantizeError(f"--cors-origin {origin} is not an origin",
                                f"give scheme://host[:port] as a browser sends it, e.g. {example}")
        allowed.append(origin)
    return allowed


def _harden(app, api_key: str | None, origins: list[str]) -> None:
    """Take out llama-cpp-python's allow-every-origin CORS and its plain `==` key check; add ours."""
    import hmac

    from fastapi import Depends, HTTPException
    from fastapi.middleware.cors import CORSMiddleware
    from llama_cpp.server import app as server

    # llama.cpp's server answers every origin, with credentials: any page open in a browser on this box
    # could query the model. Browsers read answers only when CORS allows it, so we send none by default.
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    async def authenticate(authorization=Depends(server.bearer_scheme)):  # noqa: B008 - FastAPI's idiom
        if api_key is None:
            return True
        given = authorization.credentials if authorization else ""
        if hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no key guessing by timing
            return given
        raise HTTPException(status_code=401, detail="Invalid API key")

    app.dependency_overrides[server.authenticate] = authenticate


def _check_port(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise QuantizeError(f"could not listen on {host}:{port} ({e.strerror})",
                                "is the port in use? pass another --port") from e


def _free_models() -> None:
    """Free the server's model while llama.cpp is still loaded (freed at interpreter exit, it can crash)."""
    from llama_cpp.server import app

    if app._llama_proxy is not None:
        app._llama_proxy.free()
        app._llama_proxy = None
