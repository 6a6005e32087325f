"""Unlock: the passphrase is typed into a masked field, never echoed, kept nowhere after the unlock."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Static

from appliance import api
from appliance.errors import ApplianceError, one_line
from appliance.tui import fmt


class UnlockScreen(Screen):
    def __init__(self, home):
        super().__init__()
        self.home = home

    def compose(self) -> ComposeResult:
        yield Header()
        with Center(), Vertical(id="unlock"):
            yield Static("Unlock the vault", classes="title")
            yield Label(fmt.place(self.home.root), id="unlock-home", markup=False)
            yield Input(password=True, placeholder="passphrase", id="passphrase")
            yield Label("", id="unlock-message", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#passphrase", Input).focus()

    @on(Input.Submitted, "#passphrase")
    def submitted(self, event: Input.Submitted) -> None:
        passphrase, event.input.value = event.value, ""
        if not passphrase:
            return
        event.input.disabled = True
        self.query_one("#unlock-message", Label).update("unlocking…")
        self._unlock(passphrase)

    @work(thread=True, exclusive=True)
    def _unlock(self, passphrase: str) -> None:
        try:
            vault = api.open(self.home.root, passphrase)
            vault.detach()  # attached only while reading or writing; see Vault.session
        except ApplianceError as e:
            self.app.call_from_thread(self._failed, one_line(e.message, e.hint))
            return
        self.app.call_from_thread(self.app.unlocked, vault)

    def _failed(self, line: str) -> None:
        self.query_one("#unlock-message", Label).update(line)
        self.app.notify(line, severity="error", markup=False)
        field = self.query_one("#passphrase", Input)
        field.disabled = False
        field.focus()
