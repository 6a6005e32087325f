"""Audit: the log, newest first, and `verify` with its result."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from appliance import api
from appliance.tui import actions, fmt
from appliance.tui.pages import Page, fill

# Fixed widths: the log's columns do not jump as entries come and go, and a picture of the screen never catches
# them sized to their headers (a table sizes free columns to new rows only when it is next idle).
COLUMNS = (("seq", 6), ("time", 16), ("actor", 12), ("action", 18), ("ids", 30), ("details", 60))


class AuditScreen(Page):
    MODE = "audit"
    BINDINGS = actions.bindings("audit")

    def compose_page(self) -> ComposeResult:
        yield Static("press c to verify the hash chain", id="verify-result", markup=False)
        yield DataTable(id="audit-log", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        super().on_mount()
        table = self.query_one("#audit-log", DataTable)
        for label, width in COLUMNS:
            table.add_column(label, width=width)

    def load(self, vault) -> list[dict]:
        return api.audit_log(vault, 500)["entries"][::-1]  # newest first

    def show(self, rows: list[dict]) -> None:
        fill(self.query_one("#audit-log", DataTable),
             [(str(e["seq"]), fmt.when(e["ts"]), e["actor"], e["action"], ", ".join(e["ids"])[:30],
               fmt.details(e["details"])[:60]) for e in rows])

    def action_verify(self) -> None:
        self.query_one("#verify-result", Static).update("verifying…")
        self._verify()

    @work(thread=True, exclusive=True, group="verify")
    def _verify(self) -> None:
        rep = self.app.with_vault(api.audit_verify)
        if rep is None:
            return
        text = (f"ok: {rep['entries']} entries, the chain is intact" if rep["ok"] else
                f"FAILED: {len(rep['problems'])} problem(s)\n" + "\n".join(f"  {p}" for p in rep["problems"][:20]))
        self.app.call_from_thread(self.set_text, "#verify-result", text)
        if not rep["ok"]:
            self.app.call_from_thread(self.notify, "error: audit log verification failed; the log was altered "
                                                   "outside the appliance", severity="error")
