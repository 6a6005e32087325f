"""Agents: grants, the Python API, and the MCP server driven by the official MCP Python client."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.conftest import PASSPHRASE, PY, open_vault, python_env

FLOW_CAPS = "read,ingest,train,eval,quantize"


def test_grants_are_scoped_expiring_and_revocable(home, cli):
    from appliance import grants

    g = cli("--home", home, "--json", "grant", "--agent", "planner", "--caps", "train,read", "--hours", "1").json
    assert g["caps"] == ["read", "train"] and g["token"].startswith("apg_grant-1.")
    with open_vault(home) as v:
        got = grants.check(v.con, g["token"])
        assert got.agent == "planner" and got.caps == ("read", "train")
        with pytest.raises(grants.GrantError, match="not granted 'export'"):
            got.require("export")
        for bad in ("", "apg_grant-1.wrong", "apg_grant-9.x", g["token"] + "x", "grant-1." + g["token"][12:]):
            with pytest.raises(grants.GrantError):
                grants.check(v.con, bad)
        v.con.execute("UPDATE grants SET expires = created WHERE id = 'grant-1'")
        with pytest.raises(grants.GrantError, match="expired"):
            grants.check(v.con, g["token"])
        assert g["token"].split(".")[1] not in json.dumps(v.con.execute("SELECT * FROM grants").fetchall(),
                                                          default=str)  # only a hash is kept
    g2 = cli("--home", home, "--json", "grant", "--agent", "planner", "--caps", "read").json
    assert cli("--home", home, "grant", "--revoke", g2["id"]).code == 0
    listed = cli("--home", home, "--json", "grant", "--list").json["grants"]
    assert [(x["id"], x["active"]) for x in listed] == [("grant-1", False), ("grant-2", False)]
    r = cli("--home", home, "grant", "--agent", "planner", "--caps", "read,launch")
    assert r.code == 2 and "unknown capabilities: launch" in r.err
    assert cli("--home", home, "grant", "--agent", "x", "--caps", "read", "--hours", "0").code == 2


def test_the_api_returns_what_the_cli_prints(train_home, cli):
    from appliance import api

    for args, fn in ((("vault", "datasets"), lambda v: api.vault_datasets(v)),
                     (("vault", "show", "handbook@1"), lambda v: api.vault_show(v, "handbook@1")),
                     (("lineage", "handbook-bpe@1"), lambda v: api.lineage(v, "handbook-bpe@1")),
                     (("train", "models"), lambda v: api.train_models(v)),
                     (("audit", "verify"), lambda v: api.audit_verify(v)),
                     (("eval", "suites"), lambda v: api.eval_suites()),
                     (("train", "recipes"), lambda v: api.train_recipes(home=v.home)),
                     (("jobs", "list", "--all"), lambda v: api.jobs_list(v, all=True))):
        printed = cli("--home", train_home, "--json", *args).json
        with api.open(train_home, PASSPHRASE) as v:
            direct = json.loads(json.dumps(fn(v), default=str))
        assert printed.pop("schema") == 1 and printed.pop("ok") is direct.pop("ok", True)
        assert printed == direct, args


# Commands with --json that are not API functions, and why.
NOT_IN_API = {
    "init": "makes the vault that every API function takes",
    "demo": "a showcase run, not an operation",
    "samples": "writes the sample corpus, not an operation on the vault",
    "schema": "the contract itself: appliance.schemas",
    "grant": "one command, three modes: api.grant_create, api.grant_list, api.grant_revoke",
    "generate": "inference on a GGUF needs no vault: appliance.quantize.infer",
}


def test_every_command_is_an_api_function_with_its_options():
    import inspect

    from appliance import api
    from appliance.cli import cli as group
    from appliance.schemas import commands

    missing = []
    for command in commands():
        if command in NOT_IN_API:
            continue
        fn = getattr(api, command.replace(" ", "_").replace("-", "_"), None)
        if fn is None:
            missing.append(command)
            continue
        # every option of the command is an argument of the function (under its name, or its value's name)
        cmd = group
        for word in command.split():
            cmd = cmd.commands[word]
        params = set(inspect.signature(fn).parameters)
        for p in cmd.params:
            names = {p.name, *(o.lstrip("-").replace("-", "_") for o in p.opts if o.startswith("--"))}
            if p.name == "sweep_file":
                names.add("file")
            # --list, --strict, --follow, --set and --format are the CLI's (other functions, the "ok" of the
            # report, a loop over jobs_logs, the overrides list, how `vault sql` prints the same rows)
            if names & {"json_", "home_", "verbose_", "list_", "strict", "follow", "sets", "fmt"} or names & params:
                continue
            missing.append(f"{command} --{p.name}")
    assert not missing, f"not mirrored in appliance.api: {missing}"


async def _session(home, token: str, body, inbox=None):
    env = {**python_env(), "APPLIANCE_GRANT": token, **({"APPLIANCE_MCP_INBOX": str(inbox)} if inbox else {})}
    params = StdioServerParameters(command=PY, args=["-m", "appliance", "--home", str(home), "mcp"], env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        return await body(s)


async def _call(s, tool: str, **args) -> dict:
    r = await s.call_tool(tool, args)
    assert not r.is_error, r.content[0].text
    return r.structured_content


async def _refused(s, tool: str, **args) -> str:
    r = await s.call_tool(tool, args)
    assert r.is_error
    return r.content[0].text


async def _until_done(s, job_id: str, timeout: float = 240) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        jobs = {j["id"]: j for j in (await _call(s, "jobs_list", all=True))["jobs"]}
        if jobs[job_id]["status"] not in ("queued", "running"):
            return jobs[job_id]
        await asyncio.sleep(1.0)
    raise AssertionError(f"{job_id} did not end")


@pytest.mark.slow
def test_an_agent_runs_the_whole_flow_and_is_refused_what_it_was_not_granted(train_home, cli, samples, tmp_path):
    token = cli("--home", train_home, "--json", "grant", "--agent", "planner", "--caps", FLOW_CAPS).json["token"]

    async def flow(s):
        tools = {t.name for t in (await s.list_tools()).tools}
        assert {"vault_ingest", "jobs_submit", "jobs_eval", "jobs_quantize", "bundle_export"} <= tools
        ing = await _call(s, "vault_ingest", paths=["mail"], dataset="agentmail")  # inside the inbox
        assert ing["version"] == "agentmail@1" and ing["records"] > 0
        outside = await _refused(s, "vault_ingest", paths=[str(train_home / "keyring.json")], dataset="stolen")
        assert "outside the ingest inbox" in outside
        assert "not for agents" in await _refused(s, "vault_ingest", paths=["mail"], dataset="raw", pii="off")
        assert "no shipped recipe" in await _refused(s, "jobs_submit", recipe=str(tmp_path / "mine.toml"))
        assert "must be lowercase" in await _refused(s, "jobs_submit", recipe="tiny-dense",
                                                     overrides=["name=../../escape"])
        job = await _call(s, "jobs_submit", recipe="tiny-dense",
                          overrides=["train.max_steps=4", "train.warmup_steps=0", "name=agent-run"])
        assert (await _until_done(s, job["id"]))["status"] == "done"
        ev = await _call(s, "jobs_eval", suite="handbook@1", model="agent-run@1")
        q = await _call(s, "jobs_quantize", model="agent-run@1", type="q8_0")
        assert (await _until_done(s, ev["id"]))["status"] == "done"
        assert (await _until_done(s, q["id"]))["ref"] == "agent-run@1:q8_0"
        sweep = await _call(s, "jobs_sweep", name="agent-lr", recipe="tiny-dense", space={"train.lr": [1e-3, 1e-2]},
                            overrides=["train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2"])
        swept = await _until_done(s, sweep["id"])
        assert swept["ref"] == "agent-lr@1" and len(swept["result"]["ranking"]) == 2
        logs = await _call(s, "jobs_logs", job_id=job["id"])
        assert logs["lines"][-1].endswith(f"{job['id']} done")
        assert "agent-run@1:q8_0" in [c for c in (await _call(s, "lineage", node_id="agent-run@1"))["lineage"]
                                      ["children"]]
        no_export = await _refused(s, "bundle_export", ref="agent-run@1:q8_0", sign_key="site",
                                   out=str(tmp_path / "leak.bundle"))
        no_text = await _refused(s, "vault_records", ref="agentmail@1")
        return no_export, no_text

    no_export, no_text = asyncio.run(_session(train_home, token, flow, inbox=samples))
    assert "agent:planner is not granted 'export'" in no_export and not (tmp_path / "leak.bundle").exists()
    assert "not granted 'records'" in no_text
    entries = cli("--home", train_home, "--json", "audit", "log", "--limit", "200").json["entries"]
    by_agent = [e["action"] for e in entries if e["actor"] == "agent:planner"]
    assert by_agent[:2] == ["mcp.vault_ingest", "vault.ingest"] and "mcp.jobs_submit" in by_agent
    # every refusal: the grant's two (export, records), and the four of what was named (inbox, pii, recipe, name)
    assert by_agent.count("mcp.refused") == 6 and "jobs.submit" in by_agent
    assert any(e["actor"].startswith("agent:planner (job-") and e["action"] == "train.run" for e in entries)


def test_a_revoked_grant_stops_working_mid_session(train_home, cli):
    g = cli("--home", train_home, "--json", "grant", "--agent", "scout", "--caps", "read,records").json

    async def flow(s):
        first = await _call(s, "vault_datasets")
        text = (await _call(s, "vault_records", ref="handbook@1", limit=1))["records"][0]["text"]
        assert cli("--home", train_home, "grant", "--revoke", g["id"]).code == 0
        return first, text, await _refused(s, "vault_datasets")

    first, text, refused = asyncio.run(_session(train_home, g["token"], flow))
    assert [d["name"] for d in first["datasets"]] == ["handbook", "handbook-qa", "mail"] and text
    assert f"{g['id']} was revoked" in refused


def test_mcp_without_a_valid_grant_does_not_start(train_home, cli, monkeypatch):
    monkeypatch.delenv("APPLIANCE_GRANT", raising=False)
    r = cli("--home", train_home, "mcp")
    assert r.code == 1 and "no grant token" in r.err
    monkeypatch.setenv("APPLIANCE_GRANT", "apg_grant-1.forged")
    assert "not valid" in cli("--home", train_home, "mcp").err
