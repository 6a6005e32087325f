"""One exception root: what the light `bundles` package refuses reaches every skin as an ApplianceError.

`bundles` (cryptography only, for edge devices) keeps its own `BundleError`; appliance code calls into it
inside `appliance.errors.bundle_errors()`, which turns it into `BundleRefused` with the same message, hint and
exit code. So the CLI, the API and the MCP server print the same line as before, and no module outside
appliance/errors.py imports or catches `bundles.errors`.
"""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import pytest

from appliance.errors import ApplianceError, BundleRefused, one_line
from bundles import container
from bundles.errors import BundleError
from bundles.keys import PublicKey, SecretKey
from bundles.trust import TrustStore
from tests.conftest import PASSPHRASE, open_vault

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = {"appliance/errors.py"}  # the one module where BundleError becomes BundleRefused
BUNDLE_ERRORS = {"BundleError", "UnsafeFileError"}  # bundles' root and its subclass


def _truncated(tmp_path: Path) -> Path:
    p = tmp_path / "truncated.bundle"
    p.write_bytes(container.MAGIC + b"\x10\x00")
    return p


def _forged(tmp_path: Path) -> Path:
    """A well-formed bundle signed by a key nobody trusts."""
    (tmp_path / "w.bin").write_bytes(b"weights")
    p = tmp_path / "forged.bundle"
    container.create(p, "model", "demo", 1, [("w.bin", tmp_path / "w.bin")], SecretKey.generate("stranger"),
                     {"id": "demo@1"})
    return p


def _today(fn) -> tuple[BundleError, str, int]:
    """The `bundles` error itself, its line and exit code: what the CLI printed before the translation."""
    with pytest.raises(BundleError) as got:
        fn()
    e = got.value
    return e, one_line(e.message, e.hint, e.exit_code), e.exit_code


@pytest.mark.parametrize("make", [_truncated, _forged])
def test_a_bad_bundle_is_the_same_line_in_the_cli_and_the_api(home, cli, tmp_path, make):
    from appliance import api

    bad = make(tmp_path)
    raw, line, code = _today(lambda: container.verify(bad, TrustStore([]), []))
    for command in ("verify", "import"):
        r = cli("--home", home, "bundle", command, bad)
        assert (r.code, r.err.strip()) == (code, line)
        r = cli("--home", home, "--json", "bundle", command, bad)
        assert r.code == code and {k: r.json[k] for k in ("ok", "error", "hint", "exit_code")} == {
            "ok": False, "error": raw.message, "hint": raw.hint, "exit_code": code}
    with open_vault(home) as v:
        for call in (api.bundle_verify, api.bundle_import):
            with pytest.raises(ApplianceError) as got:
                call(v, bad)
            e = got.value
            assert isinstance(e, BundleRefused) and not isinstance(e, BundleError)
            assert (one_line(e.message, e.hint, e.exit_code), e.exit_code) == (line, code)
            assert isinstance(e.__cause__, BundleError)  # kept for APPLIANCE_DEBUG


def test_a_damaged_key_is_the_same_line_in_the_cli_the_api_and_mcp(home, cli, tmp_path):
    """An agent's export checks the home's keys first (exchange.outbox_target): a damaged one is refused
    with the line the CLI prints for `keys list`."""
    from mcp.server.mcpserver.exceptions import ToolError

    from appliance import api, mcp_server
    from appliance.home import Home
    from appliance.vault import Vault

    token = cli("--home", home, "--json", "grant", "--agent", "shipper", "--caps", "export", "--hours", "1"
                ).json["token"]
    keys = home / "keys"
    keys.mkdir(mode=0o700)
    (keys / "site.pub").write_text(json.dumps({"type": "something else"}))
    _, line, code = _today(lambda: PublicKey.load(keys / "site.pub"))

    r = cli("--home", home, "keys", "list")
    assert (r.code, r.err.strip()) == (code, line)
    with open_vault(home) as v:
        with pytest.raises(BundleRefused) as got:
            api.keys_list(v)
        assert one_line(got.value.message, got.value.hint, got.value.exit_code) == line
    vault = Vault.open(Home(home), PASSPHRASE)
    vault.detach()  # detached between calls, as `appliance mcp` runs it
    server = mcp_server.build(vault, token)
    with pytest.raises(ToolError) as got:
        asyncio.run(server.call_tool("bundle_export", {"ref": "x@1", "sign_key": "site", "out": "x.bundle"}))
    assert str(got.value).endswith(f": {line}")  # after the MCP library's "Error executing tool NAME"
    with open_vault(home) as v:
        (reason,) = v.con.execute("SELECT details FROM audit WHERE action = 'mcp.refused'").fetchone()
    assert line.removeprefix("error: ").startswith(json.loads(reason)["reason"])


def test_bundle_errors_keeps_message_hint_and_exit_code():
    from appliance.errors import bundle_errors

    class Odd(BundleError):
        exit_code = 4

    @bundle_errors()
    def refuse():
        raise Odd("the bundle is odd", "ask for another")

    with pytest.raises(BundleRefused) as got:
        refuse()
    assert (got.value.message, got.value.hint, got.value.exit_code) == ("the bundle is odd", "ask for another", 4)
    assert str(got.value) == "the bundle is odd; ask for another"
    with pytest.raises(KeyError), bundle_errors():  # anything else passes through untouched
        raise KeyError("x")


# --- the boundary, read with ast ------------------------------------------------------------------------
def boundary_violations(root: Path = ROOT) -> dict[str, list[str]]:
    """Modules of appliance/ outside BOUNDARY that import bundles.errors, import or name bundles' error classes
    in an `except`, by file: what they do, with line numbers."""
    bad: dict[str, list[str]] = {}
    for path in sorted((root / "appliance").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in BOUNDARY:
            continue
        found = []
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name == "bundles.errors"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bundles":
                names = {a.name for a in node.names}
                if node.module == "bundles.errors" or (node.module == "bundles" and "errors" in names) \
                        or names & BUNDLE_ERRORS:
                    found.append(f"{node.lineno}: from {node.module} import {', '.join(sorted(names))}")
            elif isinstance(node, ast.ExceptHandler) and node.type is not None:
                caught = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                caught |= {n.attr for n in ast.walk(node.type) if isinstance(n, ast.Attribute)}
                if caught & BUNDLE_ERRORS:
                    found.append(f"{node.lineno}: except {', '.join(sorted(caught & BUNDLE_ERRORS))}")
        if found:
            bad[rel] = found
    return bad


def test_no_bundle_error_is_imported_or_caught_outside_the_boundary():
    bad = boundary_violations()
    assert not bad, ("bundles' errors past the boundary (call bundles inside appliance.errors.bundle_errors() and "
                     "catch BundleRefused):\n" + "\n".join(f"{m}: {'; '.join(f)}" for m, f in bad.items()))


def test_the_boundary_check_sees_every_form(tmp_path):
    pkg = tmp_path / "appliance"
    pkg.mkdir()
    (pkg / "errors.py").write_text("from bundles.errors import BundleError\n")  # the boundary itself: allowed
    (pkg / "ok.py").write_text("from bundles.safefile import create_at\nfrom appliance.errors import BundleRefused\n"
                               "try:\n    pass\nexcept BundleRefused:\n    pass\n")
    (pkg / "a.py").write_text("import bundles.errors\n")
    (pkg / "b.py").write_text("from bundles import errors\n")
    (pkg / "c.py").write_text("from bundles.safefile import UnsafeFileError\n")
    (pkg / "d.py").write_text("import bundles\ntry:\n    pass\nexcept (OSError, bundles.errors.BundleError):\n"
                              "    pass\n")
    bad = boundary_violations(tmp_path)
    assert sorted(bad) == ["appliance/a.py", "appliance/b.py", "appliance/c.py", "appliance/d.py"]
    assert bad["appliance/d.py"] == ["4: except BundleError"]
