"""The OpenAI-compatible server over one or two GGUFs: a deployment's model and, on trial, its candidate.

`/v1/models`, `/v1/chat/completions` and `/v1/completions` (each streaming by server-sent events too) and
`/v1/feedback`. Every answer gets an id (`chatcmpl-` or, for a completion, `cmpl-`, then 24 hex digits) that
feedback quotes. The candidate answers a share `split` of conversations, sticky per client (`router`). A
request may carry a reference answer in `metadata` (`reference`, and `expect`: contains, exact or regex),
which is recorded with it for `eval ab`. Exposure follows `appliance serve` exactly: loopback unless an API
key is set (compared in constant time), and no CORS headers unless exact origins are named
(`appliance.quantize.infer`, whose checks, hardening and `run_server` are used here as they are).
"""

import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.quantize import infer
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


def new_id(kind: str = "chat") -> str:
    """A response id: `chatcmpl-` (a chat answer) or `cmpl-` (a completion), then 24 hex digits."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def reference_of(body: dict) -> dict | str | None:
    """The reference answer a request carries in `metadata` ({"reference", "expect"}), None when it carries
    none, or what is wrong with it (a message)."""
    import re

    from appliance.serving.scores import REFERENCE_EXPECTS

    meta = body.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        return "metadata must be an object of strings"
    ref, expect = meta.get("reference"), meta.get("expect", "contains")
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref.strip():
        return "metadata.reference must be a non-empty string: the answer expected"
    if expect not in REFERENCE_EXPECTS:
        return f"metadata.expect must be one of {', '.join(REFERENCE_EXPECTS)}"
    if expect == "regex":
        try:
            re.compile(ref)
        except re.error as e:
            return f"metadata.reference is not a valid regex ({e})"
    return {"reference": ref, "expect": expect}


@dataclass
class Call:
    """One request to answer: chat (`messages`) or completion (`prompt`), and what of it is recorded."""

    kind: str
    """`chat` or `text` (a completion)."""
    question: object
    """What the model is given: the messages, or the prompt."""
    recorded: list[dict]
    """The request as it is recorded: the messages, or the prompt as one message of role `prompt`."""
    reference: dict | None

    def run(self, a: Arm, **kw):
        if self.kind == "chat":
            return a.llm.create_chat_completion(messages=self.question, **kw)
        return a.llm.create_completion(self.question, **kw)

    def text(self, choice: dict, stream: bool = False) -> str:
        if self.kind == "chat":
            return (choice.get("delta" if stream else "message") or {}).get("content") or ""
        return choice.get("text") or ""


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

    def answer(request: Request, body: dict, call: Call):
        bearer = request.headers.get("authorization", "")
        key = router.sticky_key(body.get("user"), bearer[7:] if bearer.lower().startswith("bearer ") else None,
                                request.client.host if request.client else None)
        a = arms[router.arm(deployment, key, split, "candidate" in arms)]
        kw = {k: body[k] for k in SAMPLING if body.get(k) is not None}
        if "max_tokens" not in kw and body.get("max_completion_tokens") is not None:
            kw["max_tokens"] = body["max_completion_tokens"]
        record = recorder if recorder is not None and recorder.sampled() else None
        rid, t0 = new_id(call.kind), time.perf_counter()
        if body.get("stream"):
            return StreamingResponse(_stream(a, rid, call, kw, t0, record), media_type="text/event-stream")
        try:
            with a.lock:
                res = call.run(a, **kw)
        except (ValueError, TypeError, RuntimeError) as e:
            if record:
                record.add(rid, a.arm, a.name, call.recorded, "", {}, _ms(t0), "error", None, call.reference)
            return _error(400 if isinstance(e, ValueError | TypeError) else 500, f"the model could not answer: {e}")
        res["id"], res["model"] = rid, a.name
        choice = res["choices"][0]
        if record:
            record.add(rid, a.arm, a.name, call.recorded, call.text(choice), res.get("usage") or {}, _ms(t0), "ok",
                       choice.get("finish_reason"), call.reference)
        return res

    @app.post("/v1/chat/completions", dependencies=[auth])
    def chat(request: Request, body: dict = Body(...)):  # noqa: B008 - FastAPI's idiom
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "messages must be a non-empty list of {role, content} objects")
        reference = reference_of(body)
        if isinstance(reference, str):
            return _error(400, reference)
        return answer(request, body, Call("chat", messages, messages, reference))

    @app.post("/v1/completions", dependencies=[auth])
    def completions(request: Request, body: dict = Body(...)):  # noqa: B008 - FastAPI's idiom
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # the openai client may send one prompt as a list of one
        if not isinstance(prompt, str) or not prompt:
            return _error(400, "prompt must be a non-empty string (one prompt per request)")
        reference = reference_of(body)
        if isinstance(reference, str):
            return _error(400, reference)
        return answer(request, body, Call("text", prompt, [{"role": "prompt", "content": prompt}], reference))

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


def _stream(a: Arm, rid: str, call: Call, kw: dict, t0: float, recorder: Recorder | None):
    pieces: list[str] = []
    finish, status = None, "ok"
    try:
        with a.lock:
            for chunk in call.run(a, stream=True, **kw):
                chunk["id"], chunk["model"] = rid, a.name
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if piece := call.text(choice, stream=True):
                    pieces.append(piece)
                finish = choice.get("finish_reason") or finish
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    except (ValueError, TypeError, RuntimeError):
        status = "error"
        yield f"data: {json.dumps({'error': {'message': 'the model could not answer', 'type': 'server_error'}})}\n\n"
    finally:
        if recorder is not None:
            recorder.add(rid, a.arm, a.name, call.recorded, "".join(pieces), {"completion_tokens": len(pieces)},
                         _ms(t0), status, finish, call.reference)


def serve(deployment: str, arms: list[Arm], split: float, host: str, port: int, n_ctx: int = 0, threads: int = 0,
          api_key: str | None = None, cors_origins: Sequence[str] = (), recorder: Recorder | None = None,
          on_ready: Callable[[str], None] = lambda url: None, stop: threading.Event | None = None) -> dict:
    """Load the arms' models, serve until interrupted (or until `stop` is set), then write what the recorder
    holds; its totals."""
    origins = infer.cors_allowed(cors_origins)  # before minutes of loading a large model
    infer._refuse_open_without_key(host, api_key)
    infer._check_port(host, port)
    for a in arms:
        a.llm = infer.open_model(a.path, n_ctx, threads)
    app = build_app(deployment, {a.arm: a for a in arms}, split, recorder, api_key, origins)
    written: dict = {}

    def cleanup() -> None:
        written.update(recorder.close() if recorder is not None else {})
        for a in arms:
            if a.llm is not None and hasattr(a.llm, "close"):
                a.llm.close()  # while llama.cpp is loaded: freed at interpreter exit, it can crash
            a.llm = None

    if recorder is not None:
        recorder.start()
    infer.run_server(app, host, port, on_ready, stop, cleanup)
    return written
