"""`appliance grant` and `appliance mcp`: agents drive the appliance within what the operator granted."""

from __future__ import annotations

import click

from appliance.cli import Ctx, cli, command
from appliance.errors import UsageError
from appliance.output import err, out, table


@command(cli, "grant")
@click.option("--agent", default=None, help="The agent's name; its actions are audited as agent:NAME.")
@click.option("--caps", default=None, metavar="CAP,...",
              help="Capabilities: read, records, ingest, train, eval, quantize, export.")
@click.option("--hours", type=float, default=8.0, show_default=True, help="How long the grant lasts.")
@click.option("--list", "list_", is_flag=True, help="List grants.")
@click.option("--revoke", default=None, metavar="GRANT_ID", help="Revoke a grant now.")
def grant_cmd(c: Ctx, agent, caps, hours, list_, revoke):
    """Give an agent a scoped, expiring token for `appliance mcp` (printed once; the vault keeps a hash)."""
    from appliance import grants

    if list_ or revoke:
        with c.open_vault(read_only=bool(list_)) as v:
            if revoke:
                return c.emit(grants.revoke(v, revoke), f"{revoke} revoked")
            rows = grants.listing(v.con)
        return c.emit({"grants": rows}, lambda: table(
            ["grant", "agent", "caps", "expires", "state"],
            [[g["id"], g["agent"], ",".join(g["caps"]), g["expires"],
              "active" if g["active"] else ("revoked" if g["revoked"] else "expired")] for g in rows]))
    if not agent or not caps:
        raise UsageError("--agent and --caps are needed to grant", "e.g. appliance grant --agent planner "
                                                                   "--caps read,train,eval --hours 8")
    with c.open_vault() as v:
        g = grants.create(v, agent, [x.strip() for x in caps.split(",") if x.strip()], hours)

    def human():
        out.print(f"{g['id']} for agent:{g['agent']} ({', '.join(g['caps'])}) until {g['expires']}")
        out.print(g["token"], markup=False)
        err.print("the token is shown once; give it to the agent's MCP launcher as APPLIANCE_GRANT_FILE")

    c.emit(g, human)


@command(cli, "mcp")
def mcp_cmd(c: Ctx):
    """Serve the appliance to an agent over MCP (stdio), within the grant in APPLIANCE_GRANT[_FILE]."""
    from appliance.mcp_server import serve
    from appliance.passphrase import from_env, get_passphrase

    home = c.home
    if not home.exists():
        from appliance.errors import VaultError

        raise VaultError(f"no vault at {home.root}", "run `appliance init` or pass --home")
    serve(home, get_passphrase(), from_env("APPLIANCE_GRANT"))
