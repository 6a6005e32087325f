"""One implementation, three skins: each command's `--json`, the matching `appliance.api` call and (where one
exists) the MCP tool, run on the same home, give the same result. Reads first, then one write (an ingest)
through each skin into its own dataset, whose results and stored versions must match but for the name."""

from __future__ import annotations

import asyncio
import json
import shutil

from tests.conftest import PASSPHRASE, copy_home
from tests.test_agents import _call, _session

# command words and options, the api call, and the MCP tool with its arguments (None: no tool)
READS = [
    # before anything audited runs: the entries (and their times) are the ones both copies started with
    (["audit", "log", "--limit", "5"], lambda api, v: api.audit_log(v, limit=5), None),
    (["vault", "datasets"], lambda api, v: api.vault_datasets(v), ("vault_datasets", {})),
    (["vault", "show", "handbook@1"], lambda api, v: api.vault_show(v, "handbook@1"),
     ("vault_show", {"ref": "handbook@1"})),
    # the command lists records without their text (`vault record ID` prints one); the tool pages with text
    (["vault", "records", "handbook-qa@1", "--limit", "5"],
     lambda api, v: api.vault_records(v, "handbook-qa@1", limit=5, text=False), None),
    (["vault", "sql", "SELECT name, n, records FROM versions ORDER BY vid"],
     lambda api, v: api.vault_sql(v, "SELECT name, n, records FROM versions ORDER BY vid"),
     ("vault_sql", {"query": "SELECT name, n, records FROM versions ORDER BY vid"})),
    (["lineage", "handbook-bpe@1"], lambda api, v: api.lineage(v, "handbook-bpe@1"),
     ("lineage", {"node_id": "handbook-bpe@1"})),
    (["train", "models"], lambda api, v: api.train_models(v), ("train_models", {})),
    (["train", "runs"], lambda api, v: api.train_runs(v), ("train_runs", {})),
    (["jobs", "list", "--all"], lambda api, v: api.jobs_list(v, all=True, dispatch=False),
     ("jobs_list", {"all": True})),
    (["vault", "check"], lambda api, v: api.vault_check(v), None),
    (["audit", "verify"], lambda api, v: api.audit_verify(v), None),
    (["keys", "list"], lambda api, v: api.keys_list(v), None),
    (["trust", "list"], lambda api, v: api.trust_list(v), None),
    (["quantize", "--list"], lambda api, v: api.quantize_list(v), None),
    (["eval", "suites"], lambda api, v: api.eval_suites(), None),
    (["vault", "record", "handbook-qa@1#3"], lambda api, v: api.vault_record(v, "handbook-qa@1#3"), None),
    (["train", "recipes"], lambda api, v: api.train_recipes(home=v.home), None),
]


def _plain(d: dict) -> dict:
    d = json.loads(json.dumps(d, default=str))
    d.pop("schema", None)
    d.pop("ok", None)
    return d


def _grant(cli, home, caps: str) -> str:
    r = cli("--home", home, "--json", "grant", "--agent", "door", "--caps", caps, "--hours", "1")
    assert r.code == 0, r.err
    return r.json["token"]


def test_every_read_gives_the_same_result_through_the_cli_the_api_and_mcp(train_home, cli, tmp_path):
    from appliance import api

    token = _grant(cli, train_home, "read,records")
    # the same home, once per skin: some reads are audited, and `vault check` counts audit entries
    cli_home, api_home = copy_home(train_home, tmp_path / "cli"), copy_home(train_home, tmp_path / "api")
    printed, direct = {}, {}
    for args, _, _ in READS:
        r = cli("--home", cli_home, "--json", *args)
        assert r.code == 0, (args, r.err)
        printed[" ".join(args)] = _plain(r.json)
    with api.open(api_home, PASSPHRASE) as v:
        direct = {" ".join(args): _plain(fn(api, v)) for args, fn, _ in READS}

    async def tools(s):
        return {" ".join(args): _plain(await _call(s, name, **kw)) for args, _, tool in READS if tool
                for name, kw in [tool]}

    async def records(s):
        return _plain(await _call(s, "vault_records", ref="handbook-qa@1", limit=5))

    served = asyncio.run(_session(train_home, token, tools))
    for key in printed:
        assert printed[key] == direct[key], key
        if key in served:
            assert served[key] == direct[key], key
    assert len(served) == 7
    with api.open(train_home, PASSPHRASE) as v:
        paged = _plain(api.vault_records(v, "handbook-qa@1", limit=5))
    assert asyncio.run(_session(train_home, token, records)) == paged and paged["records"][0]["text"]


def test_an_ingest_through_each_skin_lands_the_same_version(train_home, cli, samples, tmp_path):
    from appliance import api

    inbox = tmp_path / "inbox"
    shutil.copytree(samples / "handbook", inbox / "handbook")
    token = _grant(cli, train_home, "read,ingest")
    by_cli = cli("--home", train_home, "--json", "vault", "ingest", inbox / "handbook", "--dataset", "via-cli")
    assert by_cli.code == 0, by_cli.err
    with api.open(train_home, PASSPHRASE) as v:
        by_api = api.vault_ingest(v, [inbox / "handbook"], "via-api")

    async def ingest(s):
        return await _call(s, "vault_ingest", paths=["handbook"], dataset="via-mcp")

    by_mcp = asyncio.run(_session(train_home, token, ingest, inbox=inbox))
    results = [_plain(by_cli.json), _plain(by_api), _plain(by_mcp)]
    for r, name in zip(results, ("via-cli", "via-api", "via-mcp")):
        assert r.pop("version") == f"{name}@1" and r.pop("dataset", name) == name
        r.pop("seconds", None)
    assert results[0] == results[1] == results[2]
    with api.open(train_home, PASSPHRASE, read_only=True) as v:
        shown = [_plain(api.vault_show(v, f"{n}@1")) for n in ("via-cli", "via-api", "via-mcp")]
    hashes = {s["content_hash"] for s in shown}
    assert len(hashes) == 1, shown  # the same records, split and scrubbed the same way
