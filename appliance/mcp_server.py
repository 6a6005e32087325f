"""`appliance mcp`: a Model Context Protocol server over stdio, so an agent can drive the appliance.

The operator starts it (the passphrase from APPLIANCE_PASSPHRASE[_FILE], as for every command) with a
grant token from `appliance grant` in APPLIANCE_GRANT[_FILE]. Each tool is a thin skin over `appliance.api`
and returns the same JSON as the matching CLI command. On every call the grant is checked again (a revoked
or expired grant stops working mid-session) against the capability the tool needs, and the call lands in
the audit log under `agent:NAME` (refusals too, as `mcp.refused`). Record text and anything that leaves
the box (bundles) need capabilities of their own ("records", "export").
"""

from __future__ import annotations

import os
import threading
from typing import Any

from appliance import api, grants
from appliance.errors import ApplianceError, one_line
from bundles.errors import BundleError

INSTRUCTIONS = (
    "Tools of an offline model appliance. Datasets are versioned (NAME@N); training, eval and quantize run "
    "as jobs: submit, then poll jobs_list / jobs_logs until the job is done. Your grant decides what you "
    "may do; a refusal names the capability you lack."
)


AGENT_PII = ("redact", "pseudonymize")  # an agent never lands PII unscrubbed


def inbox_paths(paths: list[str], home_root) -> list[str]:
    """Paths an agent may ingest: inside the operator's inbox (APPLIANCE_MCP_INBOX), links resolved."""
    from pathlib import Path

    from appliance.errors import UsageError

    inbox = os.environ.get("APPLIANCE_MCP_INBOX")
    if not inbox:
        raise UsageError("ingest over MCP needs an inbox", "the operator sets APPLIANCE_MCP_INBOX to the folder "
                                                           "agents may ingest from")
    root = Path(inbox).resolve()
    out = []
    for p in paths:
        real = Path(root, p).resolve()  # relative paths are inside the inbox
        if not real.is_relative_to(root) or real.is_relative_to(Path(home_root).resolve()):
            raise UsageError(f"{p} is outside the ingest inbox", f"put it under {root}")
        out.append(str(real))
    return out


def shipped_only(recipe: str) -> str:
    """Agents train from the shipped recipes (and overrides); recipe files are the operator's."""
    from appliance.errors import UsageError
    from appliance.train.config import shipped

    if recipe not in shipped():
        raise UsageError(f"no shipped recipe named {recipe!r}", "use one of " + ", ".join(shipped()))
    return recipe


def build(vault, token: str):
    """The server, bound to an unlocked (detached) vault and the agent's grant token."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from appliance import __version__

    lock = threading.Lock()  # one hold on the vault at a time (tools run in worker threads)
    server = MCPServer("appliance", instructions=INSTRUCTIONS, version=__version__)

    def tool(description: str):  # every result is the command's JSON object, as structured content
        return server.tool(description=description, structured_output=True)

    def call(tool: str, cap: str, fn, **args):
        with lock:
            try:
                with vault.session(wait=30) as v:
                    try:
                        grants.check(v.con, token).require(cap)
                    except grants.GrantError as e:
                        with v.transaction():
                            v.audit("mcp.refused", [], {"tool": tool, "reason": e.message})
                        raise
                    with v.transaction():
                        v.audit(f"mcp.{tool}", [], {k: a for k, a in args.items() if a not in (None, [], "")})
                    return fn(v, **args)
            except (ApplianceError, BundleError) as e:
                raise ToolError(one_line(e.message, e.hint)) from None
            except Exception as e:  # noqa: BLE001 - one line for the agent, never a traceback
                raise ToolError(f"error: {tool} failed ({type(e).__name__})") from None

    @tool("Datasets and their newest versions (read).")
    def vault_datasets() -> dict[str, Any]:
        return call("vault_datasets", "read", api.vault_datasets)

    @tool("One dataset version: counts, splits, sources, PII report (read).")
    def vault_show(ref: str) -> dict[str, Any]:
        return call("vault_show", "read", api.vault_show, ref=ref)

    @tool("A page of a version's records with their scrubbed text (records).")
    def vault_records(ref: str, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        return call("vault_records", "records", api.vault_records, ref=ref, offset=offset, limit=min(limit, 200))

    @tool("Read-only SQL over the vault (records).")
    def vault_sql(query: str, limit: int = 100) -> dict[str, Any]:
        return call("vault_sql", "records", api.vault_sql, query=query, limit=min(limit, 10_000))

    @tool("Ingest files or directories on this box into a new version of DATASET (ingest).")
    def vault_ingest(paths: list[str], dataset: str, pii: str = "redact") -> dict[str, Any]:
        def ingest(v, paths, dataset, pii):
            if pii not in AGENT_PII:
                raise ApplianceError(f"pii {pii!r} is not for agents", "use redact or pseudonymize")
            return api.vault_ingest(v, inbox_paths(paths, v.home.root), dataset, pii)
        return call("vault_ingest", "ingest", ingest, paths=paths, dataset=dataset, pii=pii)

    @tool("Models and adapters (read).")
    def train_models() -> dict[str, Any]:
        return call("train_models", "read", api.train_models)

    @tool("Training runs and their status (read).")
    def train_runs(name: str | None = None) -> dict[str, Any]:
        return call("train_runs", "read", api.train_runs, name=name)

    @tool("What a dataset version, model, GGUF or eval run came from (read).")
    def lineage(node_id: str) -> dict[str, Any]:
        return call("lineage", "read", api.lineage, node_id=node_id)

    @tool("Queue a training run of a shipped recipe with KEY=VALUE overrides (train).")
    def jobs_submit(recipe: str, overrides: list[str] | None = None, gpus: int = 0, priority: int = 0,
                    resume: bool = False) -> dict[str, Any]:
        return call("jobs_submit", "train", lambda v, recipe, **kw: api.jobs_submit(v, shipped_only(recipe), **kw),
                    recipe=recipe, overrides=overrides or [], gpus=gpus, priority=priority, resume=resume)

    @tool("Queue a GGUF export of a model with its quality report (quantize).")
    def jobs_quantize(model: str, type: str = "q4_k_m") -> dict[str, Any]:  # noqa: A002 - the CLI's --type
        return call("jobs_quantize", "quantize", api.jobs_quantize, model=model, type=type)

    @tool("Queue an eval run: a shipped suite name or DATASET@N, on a model or GGUF (eval).")
    def jobs_eval(suite: str, model: str) -> dict[str, Any]:
        def submit(v, suite, model):
            from appliance.eval.suite import DATASET_REF, SUITES_DIR

            if not DATASET_REF.match(suite) and not (SUITES_DIR / f"{suite}.toml").is_file():
                raise ApplianceError(f"no shipped suite named {suite!r}", "use a shipped suite or DATASET@N")
            return api.jobs_eval(v, suite, model)
        return call("jobs_eval", "eval", submit, suite=suite, model=model)

    @tool("Queue a hyperparameter sweep over recipe keys, ranked by validation loss; overrides must set "
          "train.eval_every (train).")
    def jobs_sweep(name: str, recipe: str, space: dict[str, list], overrides: list[str] | None = None,
                   method: str = "grid", trials: int | None = None, seed: int = 0) -> dict[str, Any]:
        return call("jobs_sweep", "train", lambda v, recipe, **kw: api.jobs_sweep(v, recipe=shipped_only(recipe), **kw),
                    name=name, recipe=recipe, space=space,
                    overrides=overrides or [], method=method, trials=trials, seed=seed)

    @tool("Running and queued jobs; all=true for ended ones too (read).")
    def jobs_list(all: bool = False) -> dict[str, Any]:  # noqa: A002
        return call("jobs_list", "read", lambda v, all: api.jobs_list(v, all, dispatch=False), all=all)

    @tool("A job's log lines and status (read).")
    def jobs_logs(job_id: str) -> dict[str, Any]:
        return call("jobs_logs", "read", api.jobs_logs, job_id=job_id)

    @tool("Cancel a queued job or stop a running one at a checkpoint (train).")
    def jobs_cancel(job_id: str) -> dict[str, Any]:
        def cancel(v, job_id):
            from appliance.jobs import queue

            if queue.get(v.con, job_id).submitted_by != os.environ.get("APPLIANCE_ACTOR"):
                raise ApplianceError(f"{job_id} is not this agent's job", "agents cancel only the jobs they started")
            return api.jobs_cancel(v, job_id)
        return call("jobs_cancel", "train", cancel, job_id=job_id)

    @tool("Write a signed bundle of a model, GGUF, eval run or dataset to a file (export).")
    def bundle_export(ref: str, sign_key: str, out: str, to: list[str] | None = None) -> dict[str, Any]:
        return call("bundle_export", "export", api.bundle_export, ref=ref, sign_key=sign_key, out=out, to=to or [])

    return server


def serve(home, passphrase: str, token: str | None) -> None:
    """Check the grant, then answer MCP over stdin/stdout until the client goes."""
    from appliance.vault import Vault

    vault = Vault.open(home, passphrase)
    try:
        grant = grants.check(vault.con, token)
        with vault.transaction():
            vault.audit("mcp.start", [grant.id], {"agent": grant.agent, "caps": list(grant.caps)})
    finally:
        vault.close()  # attached only during calls: jobs and the console share it
    os.environ["APPLIANCE_ACTOR"] = grant.actor  # everything done here, and by jobs it starts, is the agent's
    build(vault, token).run("stdio")
