"""`appliance mcp`: a Model Context Protocol server over stdio, so an agent can drive the appliance.

The operator starts it (the passphrase from APPLIANCE_PASSPHRASE[_FILE], as for every command) with a
grant token from `appliance grant` in APPLIANCE_GRANT[_FILE]. Each tool is one line: the matching
`api.agent_*` function, which returns the same JSON as the CLI command and does every check in the core
(appliance/api/agents.py): on every call the grant is checked again (a revoked or expired grant stops working
mid-session) against the capability the tool needs, what the call names is resolved against what the vault
or the shipped folders hold (agents name things, never paths), and the call lands in the audit log under
`agent:NAME` (refusals too, as `mcp.refused`). Record text and anything that leaves the box (bundles) need
capabilities of their own ("records", "export").

Who acts is the vault handle's (`api.agent_open` sets it to the grant's agent), never the process
environment: nothing else in this process, and nothing it starts, is taken for the agent.
"""

from __future__ import annotations

import threading
from typing import Any

from appliance import api
from appliance.api import ops
from appliance.errors import ApplianceError, one_line

INSTRUCTIONS = (
    "Tools of an offline model appliance. Datasets are versioned (NAME@N); training, eval and quantize run "
    "as jobs: submit, then poll jobs_list / jobs_logs until the job is done. Your grant decides what you "
    "may do; a refusal names the capability you lack."
)


def caller(vault, token: str | None):
    """`call(api.agent_TOOL, **args)`: the agent function run on the attached vault with the grant token,
    one call at a time (tools run in worker threads); any failure reaches the agent as one line."""
    from mcp.server.mcpserver.exceptions import ToolError

    lock = threading.Lock()

    def call(fn, **args) -> dict[str, Any]:
        with lock:
            try:
                with vault.session(wait=30) as v:
                    return fn(v, token, **args)
            except ApplianceError as e:
                raise ToolError(one_line(e.message, e.hint)) from None
            except Exception as e:  # noqa: BLE001 - one line for the agent, never a traceback
                raise ToolError(f"error: {fn.__name__.removeprefix('agent_')} failed ({type(e).__name__})") from None
    return call


def read_tools(tool, call) -> None:
    """What the vault holds, models, runs and lineage (read); record text and SQL (records)."""

    @tool("Datasets and their newest versions (read).")
    def vault_datasets() -> dict[str, Any]:
        return call(api.agent_vault_datasets)

    @tool("One dataset version: counts, splits, sources, PII report (read).")
    def vault_show(ref: str) -> dict[str, Any]:
        return call(api.agent_vault_show, ref=ref)

    @tool("A page of a version's records with their scrubbed text (records).")
    def vault_records(ref: str, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        return call(api.agent_vault_records, ref=ref, offset=offset, limit=limit)

    @tool("A version's lowest-confidence PII findings in context, each value masked, to tune the policy (records).")
    def vault_pii_review(ref: str, limit: int = 20, offset: int = 0, type: str | None = None,  # noqa: A002
                         band: str | None = None, file: str | None = None) -> dict[str, Any]:
        return call(api.agent_vault_pii_review, ref=ref, limit=limit, offset=offset, type=type, band=band, file=file)

    @tool("Read-only SQL over the vault (records).")
    def vault_sql(query: str, limit: int = 100) -> dict[str, Any]:
        return call(api.agent_vault_sql, query=query, limit=limit)

    @tool("Models and adapters (read).")
    def train_models() -> dict[str, Any]:
        return call(api.agent_train_models)

    @tool("Training runs and their status (read).")
    def train_runs(name: str | None = None) -> dict[str, Any]:
        return call(api.agent_train_runs, name=name)

    @tool("What a dataset version, model, GGUF or eval run came from (read).")
    def lineage(node_id: str) -> dict[str, Any]:
        return call(api.agent_lineage, node_id=node_id)

    @tool("Deployments: the model in service, the candidate and its split, the last A/B verdict (read).")
    def deploy_list() -> dict[str, Any]:
        return call(api.agent_deploy_list)

    @tool("A deployment's model against its candidate on what they served: latency, length, refusals, ratings, "
          "with 95 % intervals and a verdict. Changes nothing (read).")
    def deploy_compare(deployment: str, min_requests: int = 30) -> dict[str, Any]:
        return call(api.agent_deploy_compare, deployment=deployment, min_requests=min_requests)


def job_tools(tool, call) -> None:
    """Long work as jobs (train, eval, quantize), and following them (read)."""

    @tool("Queue a training run of a shipped recipe with KEY=VALUE overrides of plain values; gpus and priority "
          "within the grant (train).")
    def jobs_submit(recipe: str, overrides: list[str] | None = None, gpus: int = 0, priority: int = 0,
                    resume: bool = False) -> dict[str, Any]:
        return call(api.agent_jobs_submit, recipe=recipe, overrides=overrides, gpus=gpus, priority=priority,
                    resume=resume)

    @tool("Queue a GGUF export of a model (its id in the vault) with its quality report (quantize).")
    def jobs_quantize(model: str, type: str = "q4_k_m") -> dict[str, Any]:  # noqa: A002 - the CLI's --type
        return call(api.agent_jobs_quantize, model=model, type=type)

    @tool("Queue an eval run: a shipped suite name or DATASET@N, on a model or GGUF id in the vault (eval).")
    def jobs_eval(suite: str, model: str) -> dict[str, Any]:
        return call(api.agent_jobs_eval, suite=suite, model=model)

    @tool("Queue a hyperparameter sweep over recipe keys (plain values, as jobs_submit's overrides), ranked by "
          "validation loss; overrides must set train.eval_every (train).")
    def jobs_sweep(name: str, recipe: str, space: dict[str, list], overrides: list[str] | None = None,
                   method: str = "grid", trials: int | None = None, seed: int = 0) -> dict[str, Any]:
        return call(api.agent_jobs_sweep, name=name, recipe=recipe, space=space, overrides=overrides, method=method,
                    trials=trials, seed=seed)

    @tool("Running and queued jobs; all=true for ended ones too (read).")
    def jobs_list(all: bool = False) -> dict[str, Any]:  # noqa: A002
        return call(api.agent_jobs_list, all=all)

    @tool("A job's log lines and status (read).")
    def jobs_logs(job_id: str) -> dict[str, Any]:
        return call(api.agent_jobs_logs, job_id=job_id)

    @tool("Cancel a queued job or stop a running one at a checkpoint (train).")
    def jobs_cancel(job_id: str) -> dict[str, Any]:
        return call(api.agent_jobs_cancel, job_id=job_id)


def inbound_outbound_tools(tool, call) -> None:
    """Files in (ingest, from the operator's inbox) and bundles out (export, to the home's outbox)."""

    @tool("Ingest files or directories on this box into a new version of DATASET (ingest).")
    def vault_ingest(paths: list[str], dataset: str, pii: str = "redact") -> dict[str, Any]:
        return call(api.agent_vault_ingest, paths=paths, dataset=dataset, pii=pii)

    @tool("Write a signed bundle of a model, GGUF, eval run or dataset as OUT, a file name in the home's outbox; "
          "sign_key is one of the home's keys and `to` names trusted sites to encrypt to, at least one: an "
          "agent's bundles are always encrypted (export).")
    def bundle_export(ref: str, sign_key: str, out: str, to: list[str] | None = None) -> dict[str, Any]:
        return call(api.agent_bundle_export, ref=ref, sign_key=sign_key, out=out, to=to)


TOOL_GROUPS = (read_tools, job_tools, inbound_outbound_tools)


def build(vault, token: str | None):
    """The server, bound to an agent's (detached) vault from `api.agent_open` and the agent's grant token."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("appliance", instructions=INSTRUCTIONS, version=ops.version())

    def tool(description: str):  # every result is the command's JSON object, as structured content
        return server.tool(description=description, structured_output=True)

    call = caller(vault, token)
    for group in TOOL_GROUPS:
        group(tool, call)
    return server


def serve(home, passphrase: str, token: str | None) -> None:
    """Check the grant, then answer MCP over stdin/stdout until the client goes."""
    build(api.agent_open(home, passphrase, token), token).run("stdio")
