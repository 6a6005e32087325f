"""The console: each screen's main flow driven by Pilot against a real vault, SVG snapshots at 80x24 and
120x40, and a tmux smoke test of `appliance tui` on a real terminal."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Select, Static, Tree

from appliance.home import Home
from appliance.tui.app import ApplianceApp
from tests.conftest import PASSPHRASE, PY, copy_home, open_vault, python_env

SIZES = [(80, 24), (120, 40)]


@pytest.fixture(scope="session")
def tui_base(train_base, tmp_path_factory) -> Path:
    """train_base plus a 2-step model `pilot@1`, for the models, bundles and snapshot tests."""
    from appliance.train.config import load_recipe
    from appliance.train.run import run

    h = copy_home(train_base, tmp_path_factory.mktemp("tui"))
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", ["train.max_steps=2", "train.warmup_steps=0", "name=pilot"]))
    return h


@pytest.fixture
def tui_home(tui_base, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("APPLIANCE_ACTOR", "operator")
    monkeypatch.delenv("APPLIANCE_PASSPHRASE", raising=False)  # the console asks; it never reads the env
    return copy_home(tui_base, tmp_path)


async def until(pilot, cond, timeout: float = 120.0):
    end = time.time() + timeout
    while time.time() < end:
        await pilot.pause(0.05)
        try:
            if got := cond():
                return got
        except Exception:  # noqa: BLE001 - the widget may not be mounted yet
            pass
    raise AssertionError(f"the console did not get there in time; its last error: {pilot.app.last_error}")


def text(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def rows(app, selector: str) -> list[list[str]]:
    t = app.screen.query_one(selector, DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


async def unlock(pilot, app, passphrase: str = PASSPHRASE):
    await pilot.press(*passphrase, "enter")
    await until(pilot, lambda: app.vault is not None and rows(app, "#audit"))


def drive(home: Path, flow, size=(80, 24), keymap=None):
    async def main():
        app = ApplianceApp(Home(home), keymap)
        async with app.run_test(size=size) as pilot:
            await flow(pilot, app)
    asyncio.run(main())


# --- boundaries -------------------------------------------------------------------------------------
def test_a_refresh_that_changes_nothing_leaves_a_table_alone():
    """Pages refresh on a timer: the same rows again keep the cursor and the sized columns (a cleared table shows
    its cells cut at the headers' widths until it is next idle, which a snapshot once caught)."""
    from textual.app import App

    from appliance.tui.pages import fill

    class One(App):
        def compose(self):
            yield DataTable()

    async def main():
        app = One()
        async with app.run_test() as pilot:
            t = app.query_one(DataTable)
            t.add_columns("seq", "time")
            got = [("1", "2026-01-01 00:00"), ("2", "2026-01-02 00:00")]
            assert fill(t, got) is True
            await pilot.pause()
            t.move_cursor(row=1)
            widths = [c.content_width for c in t.ordered_columns]
            assert fill(t, list(got)) is False and t.cursor_row == 1
            assert [c.content_width for c in t.ordered_columns] == widths == [3, 16]
            assert fill(t, [*got, ("3", "x")]) is True and t.row_count == 3
            assert fill(t, got, keys=["a", "b"]) is True and fill(t, got, keys=["a", "b"]) is False
    asyncio.run(main())


def test_audit_details_show_numbers_to_four_digits():
    """A loss's last digits differ from one CPU to the next: the console shows what an operator can read."""
    from appliance.tui import fmt

    got = fmt.details({"loss": 6.849109319251354, "steps": 300, "runs": [{"lr": 0.000312345}], "ok": True})
    assert got == '{"loss":6.849,"steps":300,"runs":[{"lr":0.0003123}],"ok":true}'


def test_the_core_never_imports_textual():
    code = ("import sys\n"
            "import appliance.cli, appliance.vault, appliance.train.run, appliance.eval.run, appliance.exchange\n"
            "import appliance.quantize.stage, appliance.jobs.runner, bundles.container\n"
            "assert 'textual' not in sys.modules, 'textual imported by the core'\n")
    r = subprocess.run([PY, "-c", code], env=python_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_key_map_file_is_checked(tmp_path, cli):
    from appliance.tui.actions import load_keymap

    good = tmp_path / "keys.toml"
    good.write_text('[keys]\nverify = "ctrl+v"\ndashboard = "f1"\n')
    assert load_keymap(good) == {"verify": "ctrl+v", "dashboard": "f1"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[keys]\nlaunch_missiles = "l"\n')
    r = cli("tui", "--keys", bad)
    assert r.code == 2 and r.err.count("\n") == 1 and "unknown action(s) launch_missiles" in r.err
    bad.write_text("[keys\n")
    assert cli("tui", "--keys", bad).code == 2
    assert "no key map file" in cli("tui", "--keys", tmp_path / "nope.toml").err


# --- flows --------------------------------------------------------------------------------------------
def test_unlock_says_what_the_cli_says_and_keeps_no_passphrase(tui_home, cli, monkeypatch):
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "not the passphrase")
    cli_line = cli("--home", tui_home, "vault", "datasets").err.strip()
    monkeypatch.delenv("APPLIANCE_PASSPHRASE")

    async def flow(pilot, app):
        await pilot.press("d")  # nothing but unlocking before the unlock
        assert app.current_mode == "_default"
        await pilot.press(*"not the passphrase", "enter")
        await until(pilot, lambda: "wrong" in text(app, "#unlock-message"))
        assert text(app, "#unlock-message") == cli_line
        assert app.screen.query_one("#passphrase", Input).value == ""
        await unlock(pilot, app)
        assert app.current_mode == "dashboard"
        assert "datasets 3 (3 versions" in text(app, "#summary")
        assert rows(app, "#audit")[0][3] == "train.run"  # newest first

    drive(tui_home, flow)


def test_keys_follow_the_key_map(tui_home):
    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("a")
        assert app.current_mode == "dashboard"  # remapped away
        await pilot.press("f6")
        await until(pilot, lambda: app.current_mode == "audit" and rows(app, "#audit-log"))
        await pilot.press("ctrl+v")
        await until(pilot, lambda: text(app, "#verify-result").startswith("ok:"))

    drive(tui_home, flow, keymap={"audit": "f6", "verify": "ctrl+v"})


def test_vault_screen_report_preview_sql_and_ingest(tui_home, samples):
    from appliance.vault.versions import record, show

    with open_vault(tui_home, read_only=True) as v:
        info, first = show(v.con, "mail@1"), record(v.con, "mail@1", 0)

    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("v")
        await until(pilot, lambda: len(rows(app, "#versions")) == 3)
        table = app.screen.query_one("#versions", DataTable)
        table.move_cursor(row=[r[0] for r in rows(app, "#versions")].index("mail@1"))
        table.focus()
        await pilot.press("enter")
        await until(pilot, lambda: text(app, "#report").startswith("mail@1"))
        pii = ", ".join(f"{k} {n}" for k, n in info["pii"]["total"].items())
        assert pii and f"PII found: {pii}" in text(app, "#report")
        await pilot.press("p")
        await until(pilot, lambda: text(app, "#preview").startswith("mail@1 #0"))
        assert first["text"][:60] in text(app, "#preview")
        await pilot.press("s")
        await pilot.press(*"SELECT name, n FROM versions ORDER BY name", "enter")
        await until(pilot, lambda: len(rows(app, "#sql-result")) == 3)
        assert rows(app, "#sql-result")[0] == ["handbook", "1"]
        app.screen.query_one("#vault-tabs").active = "tab-ingest"
        app.screen.query_one("#ingest-path", Input).value = str(samples / "kestrel-tools")
        app.screen.query_one("#ingest-dataset", Input).focus()
        await pilot.press(*"tools", "enter")
        await until(pilot, lambda: text(app, "#ingest-status").startswith("tools@1:"))
        await until(pilot, lambda: "tools@1" in [r[0] for r in rows(app, "#versions")])

    drive(tui_home, flow)
    with open_vault(tui_home, read_only=True) as v:
        from appliance.vault import audit

        actions = [e["action"] for e in audit.entries(v.con, 5)]
        assert "vault.sql" in actions and actions[-1] == "vault.ingest"


def test_a_run_started_here_goes_on_after_the_console_closes(tui_home):
    from appliance.jobs import queue

    async def launch(pilot, app):
        await unlock(pilot, app)
        await pilot.press("t")
        await until(pilot, lambda: app.screen.options_loaded)
        app.screen.query_one("#dataset", Select).value = "handbook"
        app.screen.query_one("#recipe", Select).value = "tiny-dense"
        app.screen.query_one("#steps", Input).value = "8"
        await pilot.press("n")
        await until(pilot, lambda: rows(app, "#train-jobs") and rows(app, "#train-jobs")[0][0] == "job-1")
        # leave at once: the run is a job of its own

    drive(tui_home, launch)

    def done():
        try:
            with open_vault(tui_home, read_only=True) as v:
                return not queue.get(v.con, "job-1").active
        except Exception:  # noqa: BLE001 - held by the runner for a moment
            return False

    end = time.time() + 180
    while not done():
        assert time.time() < end
        time.sleep(0.5)

    async def reopen(pilot, app):
        await unlock(pilot, app)
        assert rows(app, "#jobs")[0][:2] == ["job-1", "done"]
        await pilot.press("t")
        await until(pilot, lambda: "(done): step 8/8" in text(app, "#train-stats"))
        assert rows(app, "#train-jobs")[0][:5] == ["job-1", "done", "train tiny-dense", "tiny-dense@1", "8/8"]
        assert len(app.screen.query_one("#loss-plot").values) == 8

    drive(tui_home, reopen)


@pytest.mark.slow
def test_models_screen_lineage_quantize_and_evaluate(tui_home):
    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("m")
        await until(pilot, lambda: str(app.screen.query_one("#lineage", Tree).root.label).startswith("pilot@1"))
        labels = _labels(app.screen.query_one("#lineage", Tree).root)
        assert {"handbook-bpe@1 (tokenizer) [tokenizer]", "handbook@1 (dataset) [data]"} <= labels
        await pilot.press("g")
        await until(pilot, lambda: app.screen.query_one("#f-type", Select))
        app.screen.query_one("#f-type", Select).value = "q8_0"
        await pilot.click("#ok")
        await pilot.press("e")
        await until(pilot, lambda: app.screen.query_one("#f-suite", Input))
        app.screen.query_one("#f-suite", Input).value = "handbook@1"
        await pilot.click("#ok")
        # both are jobs; the screen picks up what they made as they finish
        await until(pilot, lambda: ["pilot@1:q8_0", "gguf"] in [r[:2] for r in rows(app, "#models")], timeout=240)
        await until(pilot, lambda: "eval-" in text(app, "#evals"), timeout=240)
        assert app.screen.selected == "pilot@1"
        assert "pilot@1:q8_0 (gguf)" in _labels(app.screen.query_one("#lineage", Tree).root)

    drive(tui_home, flow)


def _labels(node) -> set[str]:
    out = {str(node.label)}
    for c in node.children:
        out |= _labels(c)
    return out


@pytest.mark.slow
def test_bundles_screen_key_export_and_import_shows_the_report_first(tui_home, tmp_path, cli, monkeypatch):
    out = tmp_path / "pilot.bundle"

    async def make_key_and_export(pilot, app):
        await unlock(pilot, app)
        await pilot.press("b")
        await pilot.press("n")
        await until(pilot, lambda: app.screen.query_one("#f-name", Input))
        for field, value in (("name", "site-a"), ("passphrase", "key pass 1234"), ("again", "key pass 1234")):
            app.screen.query_one(f"#f-{field}", Input).value = value
        await pilot.click("#ok")
        await until(pilot, lambda: rows(app, "#keys") and rows(app, "#keys")[0][0] == "site-a")
        await pilot.press("x")
        await until(pilot, lambda: app.screen.query_one("#f-ref", Input))
        for field, value in (("ref", "pilot@1"), ("out", str(out)), ("passphrase", "key pass 1234")):
            app.screen.query_one(f"#f-{field}", Input).value = value
        await pilot.click("#ok")
        await until(pilot, lambda: out.exists() and any("pilot@1" in r[3] for r in rows(app, "#bundles")))
        await pilot.press("m")  # the model's lineage now ends in the bundle
        await until(pilot, lambda: f"bundle pilot v1 -> {out}" in _labels(app.screen.query_one("#lineage", Tree).root))

    drive(tui_home, make_key_and_export)
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
    assert cli("--home", tui_home, "trust", "add", tui_home / "keys" / "site-a.pub", "--name", "site-a").code == 0
    monkeypatch.delenv("APPLIANCE_PASSPHRASE")
    tampered = tmp_path / "tampered.bundle"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))

    async def import_(pilot, app):
        await unlock(pilot, app)
        await pilot.press("b")
        for path in (tampered, out):
            await pilot.press("i")
            await until(pilot, lambda: app.screen.query_one("#f-path", Input))
            app.screen.query_one("#f-path", Input).value = str(path)
            await pilot.click("#ok")
            if path == tampered:  # refused before anything is shown or lands
                await until(pilot, lambda: any(n.severity == "error" for n in app._notifications))
                continue
            await until(pilot, lambda: "signed by site-a" in str(app.screen.query_one(".report Static").render()))
            await pilot.click("#ok")
            await until(pilot, lambda: any(r[0] == "in" for r in rows(app, "#bundles")))
        [err] = [n.message for n in app._notifications if n.severity == "error"]
        assert err.startswith("error: ") and err.count("\n") == 0
        # the recipient is chosen among the trusted sites: the bundle goes out encrypted to site-a
        await pilot.press("x")
        await until(pilot, lambda: app.screen.query_one("#f-ref", Input))
        for field, value in (("ref", "pilot@1"), ("out", str(sealed)), ("passphrase", "key pass 1234")):
            app.screen.query_one(f"#f-{field}", Input).value = value
        app.screen.query_one("#f-to", Select).value = "site-a"
        await pilot.click("#ok")
        await until(pilot, lambda: sealed.exists())

    sealed = tmp_path / "sealed.bundle"
    drive(tui_home, import_)
    assert sealed.read_bytes().startswith(b"APPLIANCE-BUNDLE-1-ENC\n")
    with open_vault(tui_home, read_only=True) as v:
        assert v.con.execute("SELECT count(*) FROM bundles_in").fetchone()[0] == 1


def test_audit_screen_verifies_and_sees_tampering(tui_home):
    def verify_says(start: str):
        async def flow(pilot, app):
            await unlock(pilot, app)
            await pilot.press("a")
            await pilot.press("c")
            await until(pilot, lambda: text(app, "#verify-result").startswith(start))
        return flow

    drive(tui_home, verify_says("ok:"))
    with open_vault(tui_home) as v:
        v.con.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    drive(tui_home, verify_says("FAILED"))


def test_the_palette_offers_this_screens_actions(tui_home):
    async def flow(pilot, app):
        await unlock(pilot, app)
        await pilot.press("ctrl+p")
        await pilot.press(*"audit log")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.current_mode == "audit")
        await pilot.press("ctrl+p")
        await pilot.press(*"verify")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: text(app, "#verify-result").startswith("ok:"))

    drive(tui_home, flow)


# --- snapshots -----------------------------------------------------------------------------------
@pytest.fixture
def pinned(monkeypatch):
    """Times and sizes that change from run to run, pinned so the pictures compare."""
    from appliance.tui import fmt

    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")  # a tab underline caught mid-slide differs run to run
    monkeypatch.setattr(fmt, "when", lambda ts: "2026-01-01 00:00" if ts else "")
    monkeypatch.setattr(fmt, "disk", lambda n: "12.0 MiB")
    monkeypatch.setattr(fmt, "place", lambda path: "/srv/appliance")
    monkeypatch.setattr(fmt, "rate", lambda tps: "-" if tps is None else "1,000 tok/s")  # the train screen's runs


async def no_blink(pilot) -> None:
    """Cursor blink off (the cursor stays shown): a picture taken half a second later is the same picture."""
    from textual.widgets import Input

    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False
    await pilot.pause()


def _to(mode: str, ready):
    async def run_before(pilot):
        app = pilot.app
        await unlock(pilot, app)
        if mode != "dashboard":
            await pilot.press(mode[0])
        for _ in range(5):
            await until(pilot, lambda: ready(app))
            await no_blink(pilot)
            await settled(pilot)
            if ready(app):  # still: a table filled again meanwhile shows its columns cut until it is next idle,
                return  # and on a loaded machine that picture can hold still long enough to look settled
        raise AssertionError(f"the {mode} screen never stayed ready")
    return run_before


async def settled(pilot, timeout: float = 60.0) -> None:
    """The picture the screen shows now is the one it showed a moment ago: on a loaded machine focus, a table's
    cursor or a relayout can land after the rows are in, and a picture taken between the two differs."""
    app = pilot.app
    last, end = None, time.time() + timeout
    while time.time() < end:
        await pilot.pause(0.3)
        if app.focused is not _first_focus(app.screen):
            continue
        if (now := app.export_screenshot()) == last:
            return
        last = now
    raise AssertionError("the console never settled on one picture")


def _first_focus(screen):
    """Where focus lands on this screen: its AUTO_FOCUS, or (as the app's "*" does) the first widget that can
    take focus."""
    if focus := getattr(screen, "AUTO_FOCUS", None):
        return screen.query_one(focus)
    chain = screen.focus_chain
    return chain[0] if chain else None


def laid_out(app, selector: str) -> bool:
    """Rows are in, and the table has sized its columns to them: a DataTable measures new rows only when it is
    next idle, so a picture taken before that shows the columns at their headers' widths."""
    from rich.cells import cell_len

    t = app.screen.query_one(selector, DataTable)
    got = rows(app, selector)
    return bool(got) and all(col.content_width >= max(cell_len(r[i]) for r in got)
                             for i, col in enumerate(t.ordered_columns))


def pictured(app, selector: str) -> bool:
    """The picture itself shows every cell of the table in full. The table's own widths can say so while the
    picture still shows its columns cut (under a full run's load, twice, on the train screen)."""
    import html
    import re

    shown = html.unescape("".join(re.findall(r">([^<]*)</text>", app.export_screenshot()))).replace("\xa0", " ")
    return all(c in shown for r in rows(app, selector) for c in r if c)


READY = {
    "dashboard": lambda app: laid_out(app, "#audit"),
    # the vault's and the train screen's tables fit the terminal: their picture must show every cell in full (under
    # a full run's load the picture has lagged the table's own widths on both, each taken with its columns cut)
    "vault": lambda app: laid_out(app, "#versions") and pictured(app, "#versions"),
    "train": lambda app: app.screen.options_loaded and laid_out(app, "#train-jobs") and pictured(app, "#train-jobs"),
    "models": lambda app: "came from" in _labels(app.screen.query_one("#lineage", Tree).root)
    and laid_out(app, "#models"),
    "bundles": lambda app: app.current_mode == "bundles",
    "audit": lambda app: laid_out(app, "#audit-log"),
}


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_snapshot_unlock(snap_compare, tui_home, pinned, size):
    assert snap_compare(ApplianceApp(Home(tui_home)), terminal_size=size, run_before=no_blink)


@pytest.mark.parametrize("mode", list(READY))
@pytest.mark.parametrize("size", SIZES, ids=["80x24", "120x40"])
def test_snapshot_screens(snap_compare, tui_home, pinned, mode, size):
    assert snap_compare(ApplianceApp(Home(tui_home)), terminal_size=size, run_before=_to(mode, READY[mode]))


def test_snapshot_monochrome(snap_compare, tui_home, pinned, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert snap_compare(ApplianceApp(Home(tui_home)), run_before=_to("dashboard", READY["dashboard"]))


# --- a real terminal ------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_smoke(tui_home):
    """`appliance tui` on an 80x24 terminal: type the passphrase, open every screen, quit."""
    session = f"appliance-smoke-{time.time_ns()}"
    env = python_env()
    env.pop("APPLIANCE_PASSPHRASE", None)
    cmd = f"{sys.executable} -m appliance --home {tui_home} tui"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd], env=env, check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def wait_for(s: str, timeout: float = 60) -> str:
        end = time.time() + timeout
        while time.time() < end:
            if s in (shown := screen()):
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{s!r} never showed; the screen:\n{screen()}")

    try:
        wait_for("Unlock the vault")
        subprocess.run(["tmux", "send-keys", "-t", session, PASSPHRASE, "Enter"], check=True)
        assert PASSPHRASE not in wait_for("appliance — dashboard")
        for key, title in (("v", "vault"), ("t", "train"), ("m", "models"), ("b", "bundles"), ("a", "audit"),
                           ("d", "dashboard")):
            subprocess.run(["tmux", "send-keys", "-t", session, key], check=True)
            wait_for(f"appliance — {title}")
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        end = time.time() + 20
        while subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0:
            assert time.time() < end, "the console did not quit"
            time.sleep(0.2)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    logs = sorted((tui_home / "logs").glob("appliance.log*"))
    assert logs and not any(PASSPHRASE in p.read_text() for p in logs)  # typed, shown masked, never logged
