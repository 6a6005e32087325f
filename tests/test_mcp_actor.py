"""Who acts is passed explicitly: an agent's MCP session makes nothing else in its process the agent.

The review's attack: the MCP server set APPLIANCE_ACTOR in its own process environment for the agent, so
whatever else acted in that process (another vault handle, an operator's command, a program it starts) was
recorded as the agent, and the operator's own APPLIANCE_ACTOR was overwritten. Now the agent's vault handle
carries the actor (`api.agent_open`), and the environment is the operator's alone.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.conftest import PASSPHRASE, open_vault


def _operator_acts(home, action: str) -> None:
    """The operator's own handle on the vault, in the same process as the agent's session."""
    with open_vault(home) as v, v.transaction():
        v.audit(action, [], {})
        v.con.execute("INSERT INTO jobs (id, seq, kind, spec, status, priority, gpus, attempts, cancel, "
                      "submitted_by, created) VALUES (?, ?, 'eval', '{}', 'queued', 0, 0, 0, false, ?, now())",
                      [f"job-{action}", 100 + len(action), os.environ["APPLIANCE_ACTOR"]])


def test_an_agent_session_leaves_the_process_and_other_vault_handles_alone(home, cli, monkeypatch):
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from appliance import mcp_server
    from appliance.home import Home

    monkeypatch.setenv("APPLIANCE_ACTOR", "ops-alice")  # the operator's documented setting for the CLI
    token = cli("--home", home, "--json", "grant", "--agent", "spy", "--caps", "read,train").json["token"]
    seen: list[str] = []

    def session(server, transport):  # instead of stdio: the agent's calls, the operator acting in between
        async def calls():
            await server.call_tool("vault_datasets", {})
            _operator_acts(home, "op.during")  # another vault handle, opened during the agent's session
            with pytest.raises(ToolError, match="not this agent's job"):
                await server.call_tool("jobs_cancel", {"job_id": "job-op.during"})
            seen.append(os.environ.get("APPLIANCE_ACTOR"))

        asyncio.run(calls())

    monkeypatch.setattr(MCPServer, "run", session)
    mcp_server.serve(Home(home), PASSPHRASE, token)
    assert seen == ["ops-alice"]  # the session never made this process the agent
    assert os.environ["APPLIANCE_ACTOR"] == "ops-alice"
    _operator_acts(home, "op.after")
    assert cli("--home", home, "grant", "--agent", "other", "--caps", "read").code == 0  # a CLI call after it

    entries = cli("--home", home, "--json", "audit", "log", "--limit", "100").json["entries"]
    actor = {e["action"]: e["actor"] for e in entries}
    assert actor["mcp.vault_datasets"] == actor["mcp.jobs_cancel"] == "agent:spy"  # the agent's calls are its own
    assert actor["mcp.start"] == actor["op.during"] == actor["op.after"] == "ops-alice"
    assert [e["actor"] for e in entries if e["action"] == "grant.create"] == ["ops-alice", "ops-alice"]
    assert "jobs.cancel" not in actor  # the operator's job was not the agent's to cancel
    with open_vault(home, read_only=True) as v:
        assert v.actor is None
        assert v.con.execute("SELECT status FROM jobs WHERE id = 'job-op.during'").fetchone() == ("queued",)


def test_the_vault_handle_carries_its_actor(home, monkeypatch):
    monkeypatch.delenv("APPLIANCE_ACTOR", raising=False)
    with open_vault(home) as v:
        v.actor = "agent:scout"
        with v.transaction():
            v.audit("test.acting", [], {})
        assert "APPLIANCE_ACTOR" not in os.environ
        v.actor = None
        with v.transaction():
            v.audit("test.process", [], {})
        rows = dict(v.con.execute("SELECT action, actor FROM audit WHERE action LIKE 'test.%'").fetchall())
    assert rows["test.acting"] == "agent:scout" and rows["test.process"] not in ("agent:scout", "")
