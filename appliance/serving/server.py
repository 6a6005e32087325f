"""The OpenAI-compatible server over one or two GGUFs: a deployment's model and, on trial, its candidate.

`/v1/models`, `/v1/chat/completions` (streaming by server-sent events too) and `/v1/feedback`. Every answer
gets an id (`chatcmpl-` and 24 hex digits) that feedback quotes. The candidate answers a share `split` of
conversations, sticky per client (`router`). Exposure follows `appliance serve` exactly: loopback unless an
API key is set (compared in constant time), and no CORS headers unless exact origins are named
(`appliance.quantize.infer`, whose checks and hardening are used here as they are).
"""

import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.quantize import infer
from appliance.quantize.types import QuantizeError
from appliance.serving import router
from appliance.serving.recorder import Recorder

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty",
            "repeat_penalty")


@dataclass
class Arm:
    """One model the server answers with."""

    arm: str
    """`model` or `candidate`."""
    name: str
    """The model's id as the deployment names it, shown in each response's `model`."""
    path: Path
    llm: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    """llama.cpp's context serves one request at a time."""


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def build_app(deployment: str, arms: dict[str, Arm], split: float, recorder: Recorder | None,
              api_key: str | None, origins: Sequence[str]):
    """The FastAPI app; `arms` hold loaded models (`llm`). (This module has no postponed annotations: FastAPI
    reads the handlers' annotations, and `Request` is imported here, not at the top.)"""
    from fastapi import Body, Depends, FastAPI, Request
    from fastapi.responses import StreamingResponse
    from llama_cpp.server import app as llama_server

    app = FastAPI(title="appliance", docs_url=None, redoc_url=None, openapi_url=None)
    auth = Depends(llama_server.authenticate)  # replaced by `infer._harden` with the constant-time check

    @app.get("/v1/models", dependencies=[auth])
    def models():
        ids = [deployment] + [a.name for a in arms.values() if a.name != deployment]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "appliance"} for i in ids]}

    @app.post("/v1/chat/completions", dependencies=[auth])
    def chat(request: Request, body: dict = Body(...)):  # noqa: B008 - FastAPI's idiom
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "messages must be a non-empty list of {role, content} objects")
        bearer = request.headers.get("authorization", "")
        key = router.sticky_key(body.get("user"), bearer[7:] if bearer.lower().startswith("bearer ") else None,
                                request.client.host if request.client else None)
        a = arms[router.arm(deployment, key, split, "candidate" in arms)]
        kw = {k: body[k] for k in SAMPLING if body.get(k) is not None}
        if "max_tokens" not in kw and body.get("max_completion_tokens") is not None:
            kw["max_tokens"] = body["max_completion_tokens"]
        record = recorder is not None and recorder.sampled()
        rid, t0 = new_id(), time.perf_counter()
        if body.get("stream"):
            return StreamingResponse(_stream(a, rid, messages, kw, t0, recorder if record else None),
                                     media_type="text/event-stream")
        try:
            with a.lock:
                res = a.llm.create_chat_completion(messages=messages, **kw)
        except (ValueError, TypeError, RuntimeError) as e:
            if record:
                recorder.add(rid, a.arm, a.name, messages, "", {}, _ms(t0), "error", None)
            return _error(400 if isinstance(e, ValueError | TypeError) else 500, f"the model could not answer: {e}")
        res["id"], res["model"] = rid, a.name
        choice = res["choices"][0]
        if record:
            recorder.add(rid, a.arm, a.name, messages, choice["message"].get("content") or "", res.get("usage") or {},
                         _ms(t0), "ok", choice.get("finish_reason"))
        return res

    @app.post("/v1/feedback", dependencies=[auth])
    def feedback(body: dict = Body(...)):  # noqa: B008 - FastAPI's idiom
        rid, rating, correction = body.get("id"), body.get("rating"), body.get("correction")
        if not isinstance(rid, str) or not rid:
            return _error(400, "id is required: the id of the response the feedback is about")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            return _error(400, "rating must be an integer from 1 (worst) to 5 (best)")
        if correction is not None and not isinstance(correction, str):
            return _error(400, "correction must be a string")
        if rating is None and not correction:
            return _error(400, "give a rating, a correction or both")
        if recorder is None:
            return _error(404, "this server does not record responses, so it takes no feedback", "not_found")
        try:
            known = recorder.feedback(rid, rating, correction)
        except Exception:  # noqa: BLE001 - the vault busy past its wait: the client may try again
            return _error(503, "the vault is busy; send the feedback again shortly", "server_error")
        if not known:
            return _error(404, f"no recorded response {rid[:80]}", "not_found")
        return {"id": rid, "object": "feedback", "recorded": True}

    infer._harden(app, api_key, list(origins))
    return app


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _stream(a: Arm, rid: str, messages: list, kw: dict, t0: float, recorder: Recorder | None):
    pieces: list[str] = []
    finish, status = None, "ok"
    try:
        with a.lock:
            for chunk in a.llm.create_chat_completion(messages=messages, stream=True, **kw):
                chunk["id"], chunk["model"] = rid, a.name
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if choice.get("delta", {}).get("content"):
                    pieces.append(choice["delta"]["content"])
                finish = choice.get("finish_reason") or finish
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    except (ValueError, TypeError, RuntimeError):
        status = "error"
        yield f"data: {json.dumps({'error': {'message': 'the model could not answer', 'type': 'server_error'}})}\n\n"
    finally:
        if recorder is not None:
            recorder.add(rid, a.arm, a.name, messages, "".join(pieces), {"completion_tokens": len(pieces)}, _ms(t0),
                         status, finish)


def serve(deployment: str, arms: list[Arm], split: float, host: str, port: int, n_ctx: int = 0, threads: int = 0,
          api_key: str | None = None, cors_origins: Sequence[str] = (), recorder: Recorder | None = None,
          on_ready: Callable[[str], None] = lambda url: None, stop: threading.Event | None = None) -> dict:
    """Load the arms' models, serve until interrupted (or until `stop` is set), then write what the recorder
    holds; its totals."""
    origins = infer.cors_allowed(cors_origins)  # before minutes of loading a large model
    infer._refuse_open_without_key(host, api_key)
    try:
        import uvicorn
    except ImportError as e:
        raise QuantizeError("the server's packages are not installed", "run `make setup`") from e
    infer._check_port(host, port)
    for a in arms:
        a.llm = infer.open_model(a.path, n_ctx, threads)
    app = build_app(deployment, {a.arm: a for a in arms}, split, recorder, api_key, origins)
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
    if recorder is not None:
        recorder.start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits the process when it cannot bind or start
        if server.started:
            raise
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught after a clean shutdown
        if not server.started:
            raise
    finally:
        written = recorder.close() if recorder is not None else {}
        for a in arms:
            if a.llm is not None and hasattr(a.llm, "close"):
                a.llm.close()  # while llama.cpp is loaded: freed at interpreter exit, it can crash
            a.llm = None
    if not server.started:
        raise QuantizeError(f"could not listen on {host}:{port}", "is the port in use? pass another --port")
    return written
