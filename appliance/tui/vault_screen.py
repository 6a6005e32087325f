"""Vault: datasets and versions, a version's PII report, its records and their text, read-only SQL, ingest."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Input, ProgressBar, Static, TabbedContent, TabPane

from appliance import api
from appliance.tui import actions, fmt
from appliance.tui.forms import Field, FormDialog
from appliance.tui.pages import Page, fill


def report_text(info: dict) -> str:
    lines = [f"{info['version']}  {info['records']} records, {fmt.size(info['bytes'])}, pii {info['pii_mode']}",
             f"splits: train {info['splits']['train']}, validation {info['splits']['validation']}   "
             f"duplicates removed {info['duplicates']}",
             "kinds: " + ", ".join(f"{k} {n}" for k, n in info["kinds"].items()),
             "PII found: " + (", ".join(f"{k} {n}" for k, n in info["pii"]["total"].items()) or "none")]
    for path, counts in info["pii"]["per_file"].items():
        lines.append(f"  {path}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    lines += [f"table {t['table']}: {t['rows']} rows" for t in info["tables"]]
    bad = [s for s in info["sources"] if s["status"] != "ok"]
    lines += [f"{s['status']} {s['path']}: {s['reason']}" for s in bad]
    return "\n".join(lines)


class VaultScreen(Page):
    MODE = "vault"
    BINDINGS = actions.bindings("vault")
    AUTO_FOCUS = "#versions"  # the table, not the tabs: arrows and enter pick a version at once

    def __init__(self):
        super().__init__()
        self.version: str | None = None

    def compose_page(self) -> ComposeResult:
        with TabbedContent(id="vault-tabs"):
            with TabPane("Datasets", id="tab-datasets"):
                yield DataTable(id="versions", cursor_type="row", zebra_stripes=True)
            with TabPane("Report", id="tab-report"), VerticalScroll():
                yield Static("select a version on the Datasets tab", id="report", markup=False)
            with TabPane("Records", id="tab-records"):
                yield DataTable(id="records", cursor_type="row", zebra_stripes=True)
                with VerticalScroll(id="preview-box"):
                    yield Static("", id="preview", markup=False)
            with TabPane("SQL", id="tab-sql"):
                yield Input(placeholder="SELECT name, n, records FROM versions", id="sql")
                yield DataTable(id="sql-result", zebra_stripes=True)
            with TabPane("Ingest", id="tab-ingest"):
                with Horizontal(classes="form"):
                    yield Input(placeholder="path to ingest", id="ingest-path")
                    yield Input(placeholder="dataset", id="ingest-dataset")
                yield ProgressBar(id="ingest-bar", show_eta=False)
                yield Static("", id="ingest-status", markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#versions", DataTable).add_columns("version", "records", "size", "pii", "committed")
        self.query_one("#records", DataTable).add_columns("#", "kind", "split", "source", "bytes")

    # --- datasets and versions ------------------------------------------------------------------
    def load(self, vault) -> list[dict]:
        return api.vault_versions(vault)["versions"]

    def show(self, rows: list[dict]) -> None:
        fill(self.query_one("#versions", DataTable),
             [(r["version"], str(r["records"]), fmt.size(r["bytes"]), r["pii_mode"], fmt.when(r["committed"]))
              for r in rows], [r["version"] for r in rows])

    @on(DataTable.RowSelected, "#versions")
    def version_chosen(self, event: DataTable.RowSelected) -> None:
        self.version = event.row_key.value
        self._load_version(self.version)
        self.query_one(TabbedContent).active = "tab-report"

    @work(thread=True, exclusive=True, group="version")
    def _load_version(self, ref: str) -> None:
        got = self.app.with_vault(lambda v: (api.vault_show(v, ref),
                                             api.vault_records(v, ref, limit=200, text=False)["records"]))
        if got:
            self.app.call_from_thread(self._show_version, *got)

    def _show_version(self, info: dict, records: list[dict]) -> None:
        self.query_one("#report", Static).update(report_text(info))
        fill(self.query_one("#records", DataTable),
             [(str(r["ord"]), r["kind"], r["split"], api.record_origin(r)[-40:], str(r["bytes"])) for r in records],
             [str(r["ord"]) for r in records])

    # --- records --------------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#records")
    def record_chosen(self, event: DataTable.RowSelected) -> None:
        self.action_preview()

    def action_preview(self) -> None:
        t = self.query_one("#records", DataTable)
        if self.version is None or t.row_count == 0:
            self.notify("select a version on the Datasets tab first", severity="warning")
            return
        self.query_one(TabbedContent).active = "tab-records"
        ord_ = int(t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value)
        self._preview(self.version, ord_)

    @work(thread=True, exclusive=True, group="preview")
    def _preview(self, ref: str, ord_: int) -> None:
        rec = self.app.with_vault(lambda v: api.vault_record(v, f"{ref}#{ord_}"))
        if rec:
            head = f"{rec['version']} #{rec['ord']}  {rec['kind']}  {api.record_origin(rec)}\n\n"
            self.app.call_from_thread(self.set_text, "#preview", head + rec["text"][:8000])

    # --- SQL ------------------------------------------------------------------------------------
    def action_sql(self) -> None:
        self.query_one(TabbedContent).active = "tab-sql"
        self.query_one("#sql", Input).focus()

    @on(Input.Submitted, "#sql")
    def sql_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self._sql(event.value)

    @work(thread=True, exclusive=True, group="sql")
    def _sql(self, text: str) -> None:
        res = self.app.with_vault(lambda v: api.vault_sql(v, text, 200), write=True)  # audited, then read-only
        if res:
            self.app.call_from_thread(self._show_sql, res)

    def _show_sql(self, res: dict) -> None:
        t = self.query_one("#sql-result", DataTable)
        t.clear(columns=True)
        t.add_columns(*res["columns"])
        for row in res["rows"]:
            t.add_row(*[str(v)[:60] for v in row])
        if res["truncated"]:
            self.notify("first 200 rows shown")

    # --- ingest ---------------------------------------------------------------------------------
    def action_ingest(self) -> None:
        path = self.query_one("#ingest-path", Input).value.strip()
        dataset = self.query_one("#ingest-dataset", Input).value.strip()
        if path and dataset:
            self._start_ingest({"path": path, "dataset": dataset})
            return
        self.app.push_screen(FormDialog("Ingest into the vault", [
            Field("path", "File or directory", value=path), Field("dataset", "Dataset name", value=dataset),
            Field("pii", "PII", "choice", ["redact", "pseudonymize", "flag", "off"], "redact")], ok="Ingest"),
            self._start_ingest)

    @on(Input.Submitted, "#ingest-dataset")
    def ingest_submitted(self) -> None:
        self.action_ingest()

    def _start_ingest(self, form: dict | None) -> None:
        if not form:
            return
        self.query_one(TabbedContent).active = "tab-ingest"
        self.query_one("#ingest-status", Static).update(f"ingesting {form['path']} into {form['dataset']}…")
        self._ingest(self.query_one("#ingest-bar", ProgressBar), Path(form["path"]).expanduser(), form["dataset"],
                     form.get("pii") or "redact")

    @work(thread=True, exclusive=True, group="ingest")
    def _ingest(self, bar: ProgressBar, path: Path, dataset: str, pii: str) -> None:
        def on_plan(_n: int, total: int) -> None:
            self.app.call_from_thread(bar.update, total=total, progress=0)

        def on_item(n: int, _path: str) -> None:
            self.app.call_from_thread(bar.advance, n)

        def work_(v):
            return api.vault_ingest(v, [path], dataset, pii, progress=on_item, on_plan=on_plan)

        res = self.app.with_vault(work_, write=True, wait=30)
        if res is None:
            self.app.call_from_thread(self.set_text, "#ingest-status", f"nothing landed: {self.app.last_error}")
            return
        text = (f"{res['version']}: {res['records']} records ({res['new_records']} new), {fmt.size(res['bytes'])}, "
                f"{res['duplicates']} duplicates removed, {res['files']} files"
                + "".join(f"\nskipped {s['path']}: {s['reason']}" for s in res["skipped"])
                + "".join(f"\nfailed {s['path']}: {s['reason']}" for s in res["failed"]))
        self.app.call_from_thread(self.set_text, "#ingest-status", text)
        self.app.call_from_thread(self.notify, f"{res['version']} landed")
        self.app.call_from_thread(self.action_refresh)
