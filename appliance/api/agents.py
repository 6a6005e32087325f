"""Agents: grants, and the calls an agent makes within one, checked here so that they hold for every skin.

The operator gives an agent a grant (`grant_create`: a scoped, expiring token shown once; `grant_list`,
`grant_revoke`, `grant_check`). A skin that serves an agent (the MCP server, `appliance mcp`) opens the vault
for it with `agent_open` and passes the token with every call. Each `agent_*` function is one MCP tool: it
checks the grant again (a revoked or expired grant stops working at once, and its jobs are cancelled), then
the capability the call needs, then what the call names (`appliance.agent_refs`: names, never paths; gpus and
priority within the grant), audits the call as `mcp.TOOL` (a refusal as `mcp.refused`, then the error) and
runs the plain API function. All of it is done as the agent: the vault handle carries the grant's actor
(`agent:NAME`), so the audit log, the jobs it queues and the versions it makes name the agent, and each job
records the grant it was queued under. Nothing here touches the process environment.

Every error is an `ApplianceError` (a bundle's error is translated), one line with its hint.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from appliance.api import data, jobs, training
from appliance.errors import ApplianceError, NotFound
from appliance.home import Home


# --- grants: the operator's ---------------------------------------------------------------------------
def grant_create(v, agent: str, caps: list[str] | str, hours: float = 8.0, max_gpus: int = 0,
                 max_priority: int = 0) -> dict:
    """A grant for `agent` (`appliance grant --agent NAME --caps CAP,...`): the token is in the result and
    nowhere else (the vault keeps its hash). Its jobs ask for at most `max_gpus` GPUs and a priority of at
    most `max_priority`."""
    from appliance import grants

    if isinstance(caps, str):  # as --caps takes them
        caps = [c.strip() for c in caps.split(",") if c.strip()]
    return grants.create(v, agent, list(caps), hours, max_gpus, max_priority)


def grant_list(v) -> dict:
    """Every grant, active or not (`appliance grant --list`)."""
    from appliance import grants

    return {"grants": grants.listing(v.con)}


def grant_revoke(v, grant_id: str) -> dict:
    """End a grant now (`appliance grant --revoke ID`); the jobs queued under it are cancelled."""
    from appliance import grants

    return grants.revoke(v, grant_id)


def grant_check(v, token: str | None) -> dict:
    """The grant a token stands for, if it is valid right now (GrantError otherwise); never the token."""
    from appliance import grants

    return grants.check(v.con, token).to_json()


# --- an agent's session ---------------------------------------------------------------------------------
def agent_open(home: str | Path | Home, passphrase: str, token: str | None):
    """The vault for an agent's session, acting as the agent.

    The grant is checked and `mcp.start` audited (by whoever starts the session); the vault is then left
    detached (attached only during calls: jobs and the console share it) and its handle carries the agent's
    actor, `agent:NAME`, for everything done through it."""
    from appliance import grants
    from appliance.vault import Vault

    h = home if isinstance(home, Home) else Home(Path(home).expanduser().absolute())
    v = Vault.open(h, passphrase)
    try:
        grant = grants.check(v.con, token)
        with v.transaction():
            v.audit("mcp.start", [grant.id], {"agent": grant.agent, "caps": list(grant.caps)})
    finally:
        v.detach()  # attached only during calls
    v.actor = grant.actor
    return v


@contextmanager
def _acting(v, actor: str):
    """`v` acts as `actor` for the length of a block, in this thread only (the handle itself is unchanged:
    another thread using it meanwhile stays who it is)."""
    from appliance.vault.audit import ACTING

    token = ACTING.set(actor)
    try:
        yield v
    finally:
        ACTING.reset(token)


def _actor(v) -> str:
    from appliance.vault.audit import actor_of  # the vault (and DuckDB) only when a call runs

    return actor_of(v)


def _as_agent(v, token: str | None, tool: str, cap: str, run, vet=None, **args):
    """Check the grant, its capability `cap`, then (`vet`) what the call names and asks for; then run it as
    the grant's agent, its jobs under the grant. Refusals are audited as `mcp.refused`."""
    from appliance import grants
    from appliance.jobs import queue

    grant = None
    try:
        try:
            grant = grants.check(v.con, token)
        except grants.GrantError:
            grants.cancel_jobs(v)  # an ended grant's jobs end with it
            raise
        grant.require(cap)
        checked = vet(v, grant, **args) if vet else args
    except ApplianceError as e:  # as the grant's agent; with no valid grant, as the session's
        with _acting(v, grant.actor if grant else _actor(v)), v.transaction():
            v.audit("mcp.refused", [], {"tool": tool, "reason": e.message})
        raise _unlisted(e, grant) from None
    with _acting(v, grant.actor):
        with v.transaction():
            v.audit(f"mcp.{tool}", [], _audited(args))
        submitting = queue.SUBMITTING_GRANT.set(grant.id)  # jobs queued now are this grant's
        try:
            return run(v, **checked)
        except ApplianceError as e:
            raise _unlisted(e, grant) from None
        finally:
            queue.SUBMITTING_GRANT.reset(submitting)


def _audited(args: dict) -> dict:
    """A call's arguments as its audit entry keeps them; the paths of files to ingest scrubbed like the files'
    own paths are (a file name may hold a name or an SSN)."""
    out = {k: a for k, a in args.items() if a not in (None, [], "")}
    if isinstance(out.get("paths"), list):
        from appliance.vault.fields import FieldScrubber  # the vault only when a call runs

        fs = FieldScrubber("redact")
        out["paths"] = [fs.path(str(p), "source")[0] for p in out["paths"]]
    return out


def _unlisted(e: ApplianceError, grant) -> ApplianceError:
    """A refusal's hint names what the vault holds ("models here: ..."); an agent without `read` may not
    learn that from a mistake, so it gets a hint that names nothing."""
    if isinstance(e, NotFound) and grant is not None and "read" not in grant.caps:
        e.hint = "this grant cannot list what the vault holds; ask the operator for the exact names"
        e.args = (f"{e.message}; {e.hint}",)
    return e


# --- the tools: reading (read; record text and SQL need records) -----------------------------------------
def agent_vault_datasets(v, token: str | None) -> dict:
    """Datasets and their newest versions (read)."""
    return _as_agent(v, token, "vault_datasets", "read", data.vault_datasets)


def agent_vault_show(v, token: str | None, ref: str) -> dict:
    """One dataset version: counts, splits, sources, PII report (read)."""
    return _as_agent(v, token, "vault_show", "read", data.vault_show, ref=ref)


def agent_vault_records(v, token: str | None, ref: str, offset: int = 0, limit: int = 20) -> dict:
    """A page of a version's records with their scrubbed text, at most 200 (records)."""
    return _as_agent(v, token, "vault_records", "records", data.vault_records, ref=ref, offset=max(0, offset),
                     limit=max(1, min(limit, 200)))


def agent_vault_pii_review(v, token: str | None, ref: str, limit: int = 20, offset: int = 0, type: str | None = None,  # noqa: A002
                           band: str | None = None, file: str | None = None) -> dict:
    """The lowest-confidence PII findings of a version in masked context, at most 200 (records)."""
    return _as_agent(v, token, "vault_pii_review", "records", data.vault_pii_review, ref=ref,
                     limit=max(1, min(limit, 200)), offset=max(0, offset), type=type, band=band, file=file)


def agent_vault_sql(v, token: str | None, query: str, limit: int = 100) -> dict:
    """Read-only SQL over the vault, at most 10,000 rows (records)."""
    return _as_agent(v, token, "vault_sql", "records", data.vault_sql, query=query, limit=max(1, min(limit, 10_000)))


def agent_train_models(v, token: str | None) -> dict:
    """Models and adapters (read)."""
    return _as_agent(v, token, "train_models", "read", training.train_models)


def agent_train_runs(v, token: str | None, name: str | None = None) -> dict:
    """Training runs and their status (read)."""
    return _as_agent(v, token, "train_runs", "read", training.train_runs, name=name)


def agent_lineage(v, token: str | None, node_id: str) -> dict:
    """What a dataset version, model, GGUF or eval run came from (read)."""
    return _as_agent(v, token, "lineage", "read", data.lineage, node_id=node_id)


def agent_deploy_list(v, token: str | None) -> dict:
    """Deployments, their arms, recording and last A/B verdict (read)."""
    from appliance.api import deployments

    return _as_agent(v, token, "deploy_list", "read", deployments.deploy_list)


def agent_deploy_compare(v, token: str | None, deployment: str, min_requests: int = 30) -> dict:
    """A deployment's model against its candidate on what they served, with the verdict; changes nothing (read)."""
    from appliance.api import deployments

    return _as_agent(v, token, "deploy_compare", "read", deployments.deploy_compare, deployment=deployment,
                     min_requests=min_requests)


def agent_jobs_list(v, token: str | None, all: bool = False) -> dict:  # noqa: A002 - the CLI's --all
    """Running and queued jobs; `all` for ended ones too (read; it only reads: no dispatch)."""
    return _as_agent(v, token, "jobs_list", "read", lambda v, all: jobs.jobs_list(v, all, dispatch=False), all=all)


def agent_jobs_logs(v, token: str | None, job_id: str) -> dict:
    """A job's log lines and status (read)."""
    return _as_agent(v, token, "jobs_logs", "read", jobs.jobs_logs, job_id=job_id)


# --- the tools: work (ingest, train, eval, quantize, export) ---------------------------------------------
def agent_vault_ingest(v, token: str | None, paths: list[str], dataset: str, pii: str = "redact") -> dict:
    """Ingest files inside the operator's inbox (APPLIANCE_MCP_INBOX) into a new version of `dataset`, PII
    redacted or pseudonymized (ingest)."""
    from appliance.agent_refs import agent_pii, inbox_paths

    def vet(v, grant, paths, dataset, pii):
        return {"paths": inbox_paths(paths, v.home.root), "dataset": dataset, "pii": agent_pii(pii)}

    return _as_agent(v, token, "vault_ingest", "ingest", data.vault_ingest, vet, paths=paths, dataset=dataset,
                     pii=pii)


def agent_jobs_submit(v, token: str | None, recipe: str, overrides: list[str] | None = None, gpus: int = 0,
                      priority: int = 0, resume: bool = False) -> dict:
    """Queue a training run of a shipped recipe with overrides of plain values (agent_refs.AGENT_KEYS); gpus
    and priority within the grant (train)."""
    from appliance.agent_refs import agent_overrides, agent_recipe

    def vet(v, grant, recipe, overrides, gpus, priority, resume):
        grant.bound(gpus, priority)
        return {"recipe": agent_recipe(recipe), "overrides": agent_overrides(v.con, overrides), "gpus": gpus,
                "priority": priority, "resume": bool(resume)}

    return _as_agent(v, token, "jobs_submit", "train", jobs.jobs_submit, vet, recipe=recipe,
                     overrides=overrides or [], gpus=gpus, priority=priority, resume=resume)


def agent_jobs_quantize(v, token: str | None, model: str, type: str = "q4_k_m") -> dict:  # noqa: A002
    """Queue a GGUF export of a model (its id in the vault) with its quality report (quantize)."""
    from appliance.agent_refs import agent_model

    def vet(v, grant, model, type):  # noqa: A002
        return {"model": agent_model(v.con, model, ("model",)), "type": type}

    return _as_agent(v, token, "jobs_quantize", "quantize", jobs.jobs_quantize, vet, model=model, type=type)


def agent_jobs_eval(v, token: str | None, suite: str, model: str) -> dict:
    """Queue an eval run: a shipped suite name or DATASET@N, on a model or GGUF id in the vault (eval)."""
    from appliance.agent_refs import agent_model, agent_suite

    def vet(v, grant, suite, model):
        return {"suite": agent_suite(v.con, suite), "model": agent_model(v.con, model)}

    return _as_agent(v, token, "jobs_eval", "eval", jobs.jobs_eval, vet, suite=suite, model=model)


def agent_jobs_sweep(v, token: str | None, name: str, recipe: str, space: dict[str, list],
                     overrides: list[str] | None = None, method: str = "grid", trials: int | None = None,
                     seed: int = 0) -> dict:
    """Queue a hyperparameter sweep over recipe keys (plain values, as agent_jobs_submit's overrides) of a
    shipped recipe (train)."""
    from appliance.agent_refs import agent_name, agent_overrides, agent_recipe, agent_space

    def vet(v, grant, name, recipe, space, overrides, **kw):
        return {"name": agent_name("name", name), "recipe": agent_recipe(recipe), "space": agent_space(v.con, space),
                "overrides": agent_overrides(v.con, overrides), **kw}

    return _as_agent(v, token, "jobs_sweep", "train", jobs.jobs_sweep, vet, name=name, recipe=recipe, space=space,
                     overrides=overrides or [], method=method, trials=trials, seed=seed)


def agent_jobs_cancel(v, token: str | None, job_id: str) -> dict:
    """Cancel a queued job or stop a running one at a checkpoint: only the agent's own jobs (train)."""

    def cancel(v, job_id):
        if jobs.jobs_show(v, job_id)["submitted_by"] != _actor(v):  # the grant's agent, in this call
            raise ApplianceError(f"{job_id} is not this agent's job", "agents cancel only the jobs they started")
        return jobs.jobs_cancel(v, job_id)

    return _as_agent(v, token, "jobs_cancel", "train", cancel, job_id=job_id)


def agent_bundle_export(v, token: str | None, ref: str, sign_key: str, out: str, to: list[str] | None = None) -> dict:
    """Write a signed bundle of `ref` as OUT, a new plain file name in the home's outbox, signed by one of the
    home's keys and encrypted to trusted sites named in `to`, at least one (export): a bundle in the clear is
    refused."""
    from appliance import exchange

    def vet(v, grant, ref, sign_key, out, to):
        exchange.outbox_target(v.home, out, sign_key, to)  # names only: refused here, before anything is made
        return {"ref": ref, "sign_key": sign_key, "out": out, "recipients": to}

    return _as_agent(v, token, "bundle_export", "export", exchange.outbox_export, vet, ref=ref, sign_key=sign_key,
                     out=out, to=to or [])
