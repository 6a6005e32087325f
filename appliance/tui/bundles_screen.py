"""Bundles and keys: signing keys, trusted senders, bundles sent and received; export with a key and
recipients; import that shows the verification report before anything lands."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from appliance import api
from appliance.tui import actions, fmt
from appliance.tui.forms import ConfirmDialog, Field, FormDialog
from appliance.tui.models_screen import export_dialog
from appliance.tui.pages import Page, fill


def verification_text(r: dict) -> str:
    return "\n".join([
        f"{r['kind']} {r['name']} version {r['version']}: {r['files']} files, {fmt.size(r['bytes'])}",
        f"signed by {r['signer']} (key {r['key_id'][:16]}), trusted here",
        f"{'encrypted to this site' if r['encrypted'] else 'not encrypted'}",
        f"created {fmt.when(r['created'])}, expires {fmt.when(r['expires'])}",
        f"made from {r['source'] or '-'}",
        "", "every file's hash and the signature check out; import it?"])


class BundlesScreen(Page):
    MODE = "bundles"
    BINDINGS = actions.bindings("bundles")

    def compose_page(self) -> ComposeResult:
        yield Static("Signing keys", classes="section")
        yield DataTable(id="keys", cursor_type="row")
        yield Static("Trusted senders", classes="section")
        yield DataTable(id="trust", cursor_type="row")
        yield Static("Bundles sent and received", classes="section")
        yield DataTable(id="bundles", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#keys", DataTable).add_columns("name", "key id")
        self.query_one("#trust", DataTable).add_columns("name", "key id", "may send")
        self.query_one("#bundles", DataTable).add_columns("way", "name", "version", "id", "kind", "when")

    def load(self, vault) -> dict:
        return {"keys": api.keys_list(vault)["keys"], "trust": api.trust_list(vault)["trusted"],
                "bundles": api.bundle_history(vault)["bundles"]}  # newest first

    def show(self, data: dict) -> None:
        keys, trust, bundles = (self.query_one(f"#{i}", DataTable) for i in ("keys", "trust", "bundles"))
        fill(keys, [(k["name"], k["key_id"][:24]) for k in data["keys"]])
        fill(trust, [(t["name"], t["key_id"][:24], ", ".join(t["kinds"])) for t in data["trust"]])
        fill(bundles, [(b["way"], b["name"], str(b["version"]), b["id"], b["kind"], fmt.when(b["created"]))
                       for b in data["bundles"]])

    # --- actions --------------------------------------------------------------------------------
    def action_export(self) -> None:
        export_dialog(self)

    def action_new_key(self) -> None:
        self.app.push_screen(FormDialog("New signing key", [
            Field("name", "Key name (e.g. the site)"), Field("passphrase", "Key passphrase", "password"),
            Field("again", "Repeat it", "password")], ok="Create"), self._new_key)

    def _new_key(self, form: dict | None) -> None:
        if not form:
            return
        if form["passphrase"] != form["again"]:
            self.notify("error: the two passphrases differ; type the same one twice", severity="error")
            return
        if len(form["passphrase"]) < 8:
            self.notify("error: key passphrase too short; use at least 8 characters", severity="error")
            return
        self._create_key(form["name"], form["passphrase"])

    @work(thread=True, group="keys")
    def _create_key(self, name: str, passphrase: str) -> None:
        def go(v):
            with api.using_key_passphrase(passphrase):
                return api.keys_generate(v, name)

        pub = self.app.with_vault(go, write=True)
        if pub:
            self.app.call_from_thread(self.notify, f"key {name} created ({pub['key_id'][:16]})")
            self.app.call_from_thread(self.action_refresh)

    def action_import_bundle(self) -> None:
        self.app.push_screen(FormDialog("Import a bundle", [
            Field("path", "Bundle file"),
            Field("passphrase", "Key passphrase (for an encrypted bundle)", "password")], ok="Verify"),
            lambda f: f and f["path"] and self._verify(Path(f["path"]).expanduser(), f["passphrase"]))

    @work(thread=True, group="import")
    def _verify(self, path: Path, passphrase: str) -> None:
        def go(v):
            with api.using_key_passphrase(passphrase):
                return api.bundle_verify(v, path)

        report = self.app.with_vault(go, wait=30)
        if report:
            self.app.call_from_thread(self.app.push_screen, ConfirmDialog(
                f"Verified: {path.name}", verification_text(report), ok="Import"),
                lambda ok: ok and self._import(path, passphrase))

    @work(thread=True, group="import")
    def _import(self, path: Path, passphrase: str) -> None:
        def go(v):
            with api.using_key_passphrase(passphrase):
                return api.bundle_import(v, path)

        r = self.app.with_vault(go, write=True, wait=30)
        if r:
            self.app.call_from_thread(self.notify, f"imported {r['kind']} {r['name']} v{r['version']} as {r['id']}")
            self.app.call_from_thread(self.action_refresh)
