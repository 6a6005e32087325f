"""Dashboard: the vault at a glance, running and queued jobs, the last audit entries."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from appliance import api
from appliance.tui import fmt
from appliance.tui.pages import Page, fill


class DashboardScreen(Page):
    MODE = "dashboard"
    REFRESH_EVERY = 2.0

    def compose_page(self) -> ComposeResult:
        yield Static("", id="summary")
        yield Static("Jobs", classes="section")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield Static("Last audit entries", classes="section")
        yield DataTable(id="audit", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#jobs", DataTable).add_columns("job", "status", "what", "gpus", "ref")
        self.query_one("#audit", DataTable).add_columns("seq", "time", "actor", "action", "ids")

    def load(self, vault) -> dict:
        return api.overview(vault)  # counts as the CLI counts them; running, queued and the last ended jobs

    def show(self, s: dict) -> None:
        running = sum(j["status"] == "running" for j in s["jobs"])
        queued = sum(j["status"] == "queued" for j in s["jobs"])
        self.query_one("#summary", Static).update(
            f"vault {fmt.disk(s['size'])}   datasets {s['datasets']} ({s['versions']} versions, "
            f"{s['records']} records summed over them)\n"
            f"models {s['models']}   GGUF {s['ggufs']}   eval runs {s['evals']}   "
            f"jobs: {running} running, {queued} queued")
        fill(self.query_one("#jobs", DataTable),
             [(j["id"], j["status"], api.jobs_describe(j["kind"], j["spec"]), str(j["gpus"] or "cpu"), j["ref"] or "")
              for j in s["jobs"]])
        fill(self.query_one("#audit", DataTable),
             [(str(e["seq"]), fmt.when(e["ts"]), e["actor"], e["action"], ", ".join(e["ids"])[:40])
              for e in s["audit"]])
