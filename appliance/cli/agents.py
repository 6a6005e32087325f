"""`appliance grant` and `appliance mcp`: agents drive the appliance within what the operator granted."""

from __future__ import annotations

import click

from appliance import api
from appliance.cli.app import Ctx, cli, command
from appliance.cli.output import err, out, table
from appliance.errors import UsageError


@command(cli, "grant")
@click.option("--agent", default=None, help="The agent's name; its actions are audited as agent:NAME.")
@click.option("--caps", default=None, metavar="CAP,...",
              help="Capabilities: read, records, ingest, train, eval, quantize, export.")
@click.option("--hours", type=float, default=8.0, show_default=True, help="How long the grant lasts.")
@click.option("--max-gpus", type=int, default=0, show_default=True,
              help="Most GPUs one of the agent's jobs may ask for (0: CPU jobs only).")
@click.option("--max-priority", type=int, default=0, show_default=True,
              help="Highest priority the agent's jobs may ask for.")
@click.option("--list", "list_", is_flag=True, help="List grants.")
@click.option("--revoke", default=None, metavar="GRANT_ID", help="Revoke a grant now.")
def grant_cmd(c: Ctx, agent, caps, hours, max_gpus, max_priority, list_, revoke):
    """Give an agent a scoped, expiring token for `appliance mcp` (printed once; the vault keeps a hash)."""
    if list_ or revoke:
        with c.open_vault(read_only=bool(list_)) as v:
            if revoke:
                r = api.grant_revoke(v, revoke)
                return c.emit(r, f"{revoke} revoked" + (f"; cancelled {', '.join(r['cancelled_jobs'])}"
                                                        if r["cancelled_jobs"] else ""))
            rows = api.grant_list(v)["grants"]
        return c.emit({"grants": rows}, lambda: table(
            ["grant", "agent", "caps", "expires", "state"],
            [[g["id"], g["agent"], ",".join(g["caps"]), g["expires"],
              "active" if g["active"] else ("revoked" if g["revoked"] else "expired")] for g in rows]))
    if not agent or not caps:
        raise UsageError("--agent and --caps are needed to grant", "e.g. appliance grant --agent planner "
                                                                   "--caps read,train,eval --hours 8")
    with c.open_vault() as v:
        g = api.grant_create(v, agent, [x.strip() for x in caps.split(",") if x.strip()], hours, max_gpus, max_priority)

    def human():
        out.print(f"{g['id']} for agent:{g['agent']} ({', '.join(g['caps'])}) until {g['expires']}")
        out.print(g["token"], markup=False)
        err.print("the token is shown once; give it to the agent's MCP launcher as APPLIANCE_GRANT_FILE")

    c.emit(g, human)


@command(cli, "mcp")
def mcp_cmd(c: Ctx):
    """Serve the appliance to an agent over MCP (stdio), within the grant in APPLIANCE_GRANT[_FILE]."""
    from appliance.mcp_server import serve

    home = c.home
    if not home.exists():
        from appliance.errors import VaultError

        raise VaultError(f"no vault at {home.root}", "run `appliance init` or pass --home")
    serve(home, api.get_passphrase(), api.secret_from_env("APPLIANCE_GRANT"))
