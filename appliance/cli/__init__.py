"""The `appliance` command: one table of commands, thin over the library's one door, `appliance.api`.

It imports only `appliance.api` (any of its modules), `appliance.errors`, the standard library, click and
rich, plus the entry points of what it starts: the console (`appliance.tui.app.ApplianceApp`), the MCP server
(`appliance.mcp_server.serve`) and the showcase (`appliance.demo`); tests/test_import_graph.py holds it so.

Layout: `app` holds what every command shares (the root group `cli`, the context, argument helpers);
`output` the printing (JSON, tables, progress; numbers for people come from `appliance.api.format`); one
module per command group registers its commands on it (`vault`, `train`, `eval`, `quantize`, `bundles`,
`jobs`, `ops`, `agents`, `synth`, `misc`); `entry` imports them all and holds `main`, the console script
(`appliance.cli:main`) and `python -m appliance`.
"""

from appliance.cli.entry import cli, main

__all__ = ["cli", "main"]
