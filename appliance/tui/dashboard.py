"""Dashboard: the vault at a glance, running and queued jobs, the last audit entries."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from appliance.tui import fmt
from appliance.tui.pages import Page


def summary(vault) -> dict:
    from appliance.vault.versions import totals

    con = vault.con
    one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    return {"size": vault.home.database.stat().st_size,
            **totals(con),  # datasets, versions, records (summed over the versions), distinct_records
            "models": one("SELECT count(*) FROM lineage_nodes WHERE kind IN ('model', 'adapter')"),
            "ggufs": one("SELECT count(*) FROM lineage_nodes WHERE kind = 'gguf'"),
            "evals": one("SELECT count(*) FROM eval_runs")}


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
        from appliance.jobs import queue
        from appliance.vault import audit

        jobs = queue.listing(vault.con, ("running", "queued")) + queue.listing(vault.con, queue.FINAL, limit=3)
        return {"summary": summary(vault), "jobs": jobs, "audit": audit.entries(vault.con, 6)[::-1]}

    def show(self, data: dict) -> None:
        s = data["summary"]
        running = sum(j.status == "running" for j in data["jobs"])
        queued = sum(j.status == "queued" for j in data["jobs"])
        self.query_one("#summary", Static).update(
            f"vault {fmt.disk(s['size'])}   datasets {s['datasets']} ({s['versions']} versions, "
            f"{s['records']} records summed over them)\n"
            f"models {s['models']}   GGUF {s['ggufs']}   eval runs {s['evals']}   "
            f"jobs: {running} running, {queued} queued")
        jobs = self.query_one("#jobs", DataTable)
        jobs.clear()
        for j in data["jobs"]:
            jobs.add_row(j.id, j.status, j.describe(), str(j.gpus or "cpu"), j.ref or "")
        log = self.query_one("#audit", DataTable)
        log.clear()
        for e in data["audit"]:
            log.add_row(str(e["seq"]), fmt.when(e["ts"]), e["actor"], e["action"], ", ".join(e["ids"])[:40])
