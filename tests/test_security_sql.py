"""`vault sql` is read-only: DuckDB's parser decides what runs, and the connection cannot open a file anyway.

Every attack goes through the real command and must be refused with one line, exit non-zero, the vault's
bytes unchanged and no new file under the home or the test's directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Imported at collection, not under capture: the MCP client binds sys.stderr as the server's stderr.
import mcp.client.stdio  # noqa: F401
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import PASSPHRASE, copy_home, open_vault

# {home} is the vault home, {out} a directory of the test's own; both are checked for new files.
ATTACKS = [
    # Writes and DDL.
    "INSERT INTO blobs VALUES ('h', 't', 1)",
    "UPDATE blobs SET bytes = 0",
    "DELETE FROM blobs",
    "CREATE TABLE x (a INT)",
    "DROP TABLE blobs",
    "ALTER TABLE blobs ADD COLUMN y INT",
    # Files: COPY, and COPY run inside EXPLAIN ANALYZE in every spelling.
    "COPY blobs TO '{out}/leak.csv'",
    "COPY (SELECT text FROM blobs) TO '{home}/tmp/leak.csv'",
    "EXPLAIN ANALYSE COPY (SELECT text FROM blobs) TO '{home}/tmp/x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT text FROM blobs) TO '{out}/x.csv'",
    "EXPLAIN ANALYSE COPY (SELECT 1) TO '{home}/vault.duckdb' (USE_TMP_FILE false)",
    "EXPLAIN ANALYZE SELECT 1",
    "explain analyse select 1",
    "EXPLAIN /* c */ ANALYSE COPY (SELECT 1) TO '{out}/c.csv'",
    "EXPLAIN (ANALYZE) SELECT 1",
    "EXPLAIN (FORMAT json, ANALYZE) COPY (SELECT 1) TO '{out}/j.csv'",
    "EXPLAIN COPY (SELECT 1) TO '{out}/e.csv'",
    "EXPLAIN EXPLAIN ANALYZE SELECT 1",
    "EXPORT DATABASE '{out}/dump'",
    # Other databases, extensions, settings, maintenance.
    "ATTACH '{out}/other.duckdb' AS other",
    "DETACH vault",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA enable_profiling",
    "PRAGMA disable_checkpoint_on_shutdown",
    "SET temp_file_encryption = false",
    "RESET temp_file_encryption",
    "SET enable_external_access = true",
    "SET VARIABLE x = 1",
    "CALL enable_logging()",
    "CALL force_checkpoint()",
    "CHECKPOINT",
    "VACUUM",
    "ANALYZE",
    # Table functions with side effects, or that run SQL the check never saw.
    "SELECT * FROM enable_logging(storage = 'file', storage_path = '{home}/tmp/logs')",
    "SELECT * FROM enable_logging()",
    "SELECT * FROM disable_logging()",
    "SELECT * FROM truncate_duckdb_logs()",
    "SELECT * FROM checkpoint()",
    "SELECT * FROM force_checkpoint()",
    "SELECT * FROM query('SELECT 1')",
    "SELECT * FROM query_table('blobs')",
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
    "SELECT * FROM duckdb_logs_parsed('QueryLog')",
    "SELECT setseed(0.5)",
    "SELECT nextval('s')",
    "SELECT write_log('record text', level := 'error')",
    # File readers, direct, nested, and as replacement scans.
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('{home}/keyring.json')",
    "SELECT * FROM read_blob('{home}/vault.duckdb')",
    "SELECT * FROM read_parquet('{out}/x.parquet')",
    "SELECT * FROM read_json_auto('{home}/keyring.json')",
    "SELECT * FROM glob('{home}/*')",
    "SELECT * FROM sniff_csv('{home}/keyring.json')",
    "SELECT * FROM parquet_metadata('{out}/x.parquet')",
    "FROM read_text('{home}/keyring.json')",
    "SELECT * FROM '{home}/keyring.json'",
    "SELECT * FROM '{home}/tmp/*.csv'",
    "DESCRIBE '{home}/keyring.json'",
    "SELECT (SELECT content FROM read_text('{home}/keyring.json'))",
    "WITH a AS (SELECT * FROM glob('{home}/*')) SELECT * FROM a",
    "SELECT * FROM (WITH \"{home}/keyring.json\" AS (SELECT 1) SELECT 1), \"{home}/keyring.json\"",
    "SELECT * FROM blobs WHERE hash IN (SELECT file FROM glob('{home}/*'))",
    # A harmless statement first, comments, odd spacing and case.
    "SELECT 1; COPY blobs TO '{out}/x.csv'",
    "SELECT 1; DROP TABLE blobs",
    "SELECT 1 -- fine\n; ATTACH '{out}/o.duckdb' AS o",
    "/* hi */ copy blobs to '{out}/x.csv'",
    "  dElEtE\n\tFROM   blobs  ",
    "SELECT 1; SELECT 2",
]


@pytest.fixture(scope="module")
def sql_home(filled_home, tmp_path_factory) -> Path:
    """A private copy of the filled vault (a successful query appends to its audit log), used once by the CLI
    so that its lock and log files exist before the first attack is compared against it."""
    from appliance.cli import main

    h = copy_home(filled_home, tmp_path_factory.mktemp("sqlsec"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
        main(["--home", str(h), "vault", "datasets"])  # returns on success, exits on failure
    assert (h / "logs" / "appliance.log").is_file()
    return h


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sqlout")


def _state(*roots: Path) -> tuple[str, set[Path]]:
    """The vault file's sha256 and every file (and folder) under the roots."""
    home = roots[0]
    digest = hashlib.sha256((home / "vault.duckdb").read_bytes()).hexdigest()
    return digest, {p for r in roots for p in r.rglob("*")}


def _refused(cli, home: Path, out: Path, attack: str) -> str:
    text = attack.replace("{home}", str(home)).replace("{out}", str(out))
    before = _state(home, out)
    r = cli("--home", home, "vault", "sql", text)
    after = _state(home, out)
    assert r.code in (1, 2), (text, r.code, r.out)
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, (text, r.err)
    assert after[0] == before[0], f"vault bytes changed by {text!r}"
    assert after[1] == before[1], f"{text!r} left {sorted(after[1] - before[1])}"
    return r.err


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_refused(sql_home, out_dir, cli, attack):
    _refused(cli, sql_home, out_dir, attack)


def test_explain_analyse_writes_nothing(sql_home, out_dir, cli):
    """The reported break: EXPLAIN ANALYSE (British spelling) ran a COPY that leaked records or truncated the vault."""
    for target in ("{home}/tmp/x.csv", "{home}/vault.duckdb"):
        err = _refused(cli, sql_home, out_dir, f"EXPLAIN ANALYSE COPY (SELECT text FROM blobs) TO '{target}' "
                                               "(USE_TMP_FILE false)")
        assert "EXPLAIN ANALYZE is not allowed" in err
    assert cli("--home", sql_home, "vault", "check").code == 0


def test_file_readers_and_side_effects_say_why(sql_home, out_dir, cli):
    assert "may not read or write files" in _refused(cli, sql_home, out_dir, "SELECT * FROM read_text('x')")
    assert "enable_logging() is not allowed" in _refused(cli, sql_home, out_dir, "SELECT * FROM enable_logging()")
    assert "setseed() here" in _refused(cli, sql_home, out_dir, "SELECT setseed(0.1)")
    assert "only SELECT is allowed here, not COPY" in _refused(cli, sql_home, out_dir, "SELECT 1; COPY blobs TO 'x'")


# Variants of the attacks: keyword case, whitespace and comments between tokens, leading/trailing noise.
SPELLED = [
    "EXPLAIN ANALYSE COPY (SELECT text FROM blobs) TO '{home}/tmp/v.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{home}/vault.duckdb' (USE_TMP_FILE false)",
    "COPY blobs TO '{out}/v.csv'",
    "SELECT * FROM enable_logging(storage = 'file', storage_path = '{home}/tmp/vlogs')",
    "SELECT * FROM read_text('{home}/keyring.json')",
    "SELECT * FROM '{home}/keyring.json'",
    "SELECT 1 ; ATTACH '{out}/v.duckdb' AS v",
    "CALL enable_logging()",
    "SELECT * FROM checkpoint()",
    "SET temp_file_encryption = false",
    "EXPORT DATABASE '{out}/vdump'",
]
GAPS = st.sampled_from([" ", "  ", "\n", "\t", " /* x */ ", "/**/", " -- c\n", "\r\n "])


@st.composite
def spelled(draw) -> str:
    tokens = draw(st.sampled_from(SPELLED)).split(" ")
    out = [draw(st.sampled_from(["", "/* a */ ", "-- lead\n", "\n\t"]))]
    for i, tok in enumerate(tokens):
        if not tok.startswith("'"):  # keep path literals as they are
            flips = draw(st.lists(st.booleans(), min_size=len(tok), max_size=len(tok)))
            tok = "".join(c.swapcase() if f else c for c, f in zip(tok, flips))
        out.append(tok if i == 0 else draw(GAPS) + tok)
    out.append(draw(st.sampled_from(["", ";", " ; ", "; -- tail", " /* tail */"])))
    return "".join(out)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(attack=spelled())
def test_spelling_variants_are_refused(sql_home, out_dir, cli, attack):
    _refused(cli, sql_home, out_dir, attack)


def test_ordinary_selects_still_work(sql_home, cli):
    for query, check in [
        ("SELECT count(*) AS n FROM data.t1_equipment", lambda j: j["rows"] == [[240]]),
        ("SELECT v.name, count(*) AS n FROM version_records r JOIN versions v ON v.vid = r.vid GROUP BY ALL",
         lambda j: j["rows"][0][0] == "corpus" and j["rows"][0][1] > 0),
        ("WITH k AS (SELECT kind, count(*) AS n FROM version_records GROUP BY kind) "
         "SELECT kind, n, rank() OVER (ORDER BY n DESC) FROM k ORDER BY n DESC, kind", lambda j: len(j["rows"]) > 1),
        ("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY 1",
         lambda j: ["blobs"] in j["rows"]),
        ("SELECT count(*) FROM information_schema.tables", lambda j: j["rows"][0][0] > 5),
        ("SELECT sum(i) FROM range(10) t(i)", lambda j: j["rows"] == [[45]]),
        ("SELECT x FROM unnest([1, 2]) u(x) ORDER BY x", lambda j: j["rows"] == [[1], [2]]),
        ("SELECT current_setting('temp_file_encryption')::VARCHAR AS enc", lambda j: j["rows"] == [["true"]]),
        ("select (now() IS NOT NULL)::INT, (random() < 1)::INT", lambda j: j["rows"] == [[1, 1]]),
        ("EXPLAIN SELECT * FROM blobs", lambda j: j["columns"] == ["explain_key", "explain_value"]),
        ("explain /* plan */ select 1;", lambda j: len(j["rows"]) == 1),
        ("SELECT column_name FROM (DESCRIBE blobs)", lambda j: ["hash"] in j["rows"]),
        ("SELECT name FROM (SHOW TABLES)", lambda j: ["blobs"] in j["rows"]),
        ("FROM vault.main.versions SELECT name", lambda j: j["rows"] == [["corpus"]]),
    ]:
        r = cli("--home", sql_home, "--json", "vault", "sql", query)  # --json is checked against the schema
        assert r.code == 0 and check(r.json), (query, r.err, r.out[:300])


def test_connection_cannot_write_even_past_the_check(sql_home, out_dir):
    """The second layer: on the locked-down attach no file opens by name, and no setting can be changed back."""
    import duckdb

    from appliance.vault import versions

    digest = hashlib.sha256((sql_home / "vault.duckdb").read_bytes()).hexdigest()
    with open_vault(sql_home, read_only=True) as v:
        versions._lock_down(v.con)
        for raw in (f"COPY (SELECT 1) TO '{sql_home}/vault.duckdb' (USE_TMP_FILE false)",
                    f"COPY (SELECT text FROM blobs) TO '{sql_home}/tmp/x.csv'",
                    f"SELECT * FROM read_text('{sql_home}/keyring.json')",
                    f"SELECT * FROM enable_logging(storage = 'file', storage_path = '{sql_home}/tmp/l')"):
            with pytest.raises(duckdb.Error):
                v.con.execute(raw).fetchall()
                v.con.execute("SELECT count(*) FROM blobs").fetchall()  # a log write, if logging got on
        for raw in ("SET disabled_filesystems = ''", "SET enable_external_access = true",
                    "SET temp_file_encryption = false", "SET lock_configuration = false"):
            with pytest.raises(duckdb.InvalidInputException, match="locked"):
                v.con.execute(raw)
        assert v.con.execute("SELECT count(*) > 0 FROM blobs").fetchone() == (True,)  # reading still works
    assert hashlib.sha256((sql_home / "vault.duckdb").read_bytes()).hexdigest() == digest
    assert not list((sql_home / "tmp").iterdir())


def test_every_path_runs_the_same_check(sql_home):
    """The CLI, the console and MCP all call api.vault_sql / versions.query."""
    import inspect

    from appliance import api, mcp_server
    from appliance.errors import VaultError
    from appliance.tui import vault_screen

    assert "versions.query(" in inspect.getsource(api.vault_sql)
    assert "api.agent_vault_sql" in inspect.getsource(mcp_server.read_tools)
    assert "data.vault_sql" in inspect.getsource(api.agent_vault_sql)  # the grant checked, then the same function
    assert "api.vault_sql(v, text" in inspect.getsource(vault_screen)
    with open_vault(sql_home) as v:
        with pytest.raises(VaultError, match="EXPLAIN ANALYZE is not allowed"):
            api.vault_sql(v, f"EXPLAIN ANALYSE COPY (SELECT 1) TO '{sql_home}/vault.duckdb' (USE_TMP_FILE false)")
    assert not list((sql_home / "tmp").iterdir())
    assert open_vault(sql_home, read_only=True).close() is None  # still opens


def test_mcp_vault_sql_refuses(sql_home, cli):
    import asyncio

    from tests.test_agents import _call, _session
    from tests.test_agents import _refused as mcp_refused

    token = cli("--home", sql_home, "--json", "grant", "--agent", "sqltest", "--caps", "read,records").json["token"]
    leak = sql_home / "tmp" / "mcp.csv"

    async def body(s):
        msg = await mcp_refused(s, "vault_sql", query=f"EXPLAIN ANALYSE COPY (SELECT text FROM blobs) TO '{leak}'")
        ok = await _call(s, "vault_sql", query="SELECT count(*) AS n FROM data.t1_equipment")
        return msg, ok

    msg, ok = asyncio.run(_session(sql_home, token, body))
    assert "EXPLAIN ANALYZE is not allowed" in msg and not leak.exists()
    assert ok["rows"] == [[240]]


def test_console_sql_panel_refuses(sql_home, monkeypatch):
    from textual.widgets import Input

    from tests.test_tui import drive, unlock, until

    monkeypatch.delenv("APPLIANCE_PASSPHRASE", raising=False)  # the console asks
    leak = sql_home / "tmp" / "console.csv"

    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("v")
        await pilot.press("s")
        before = _state(sql_home)
        box = app.screen.query_one("#sql", Input)
        box.value = f"EXPLAIN ANALYSE COPY (SELECT text FROM blobs) TO '{leak}'"
        box.focus()
        await pilot.press("enter")
        await until(pilot, lambda: "EXPLAIN ANALYZE is not allowed" in (app.last_error or ""))
        assert _state(sql_home) == before

    drive(sql_home, flow)
    assert not leak.exists()
