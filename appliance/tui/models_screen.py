"""Models: every model, adapter and GGUF; the lineage of the selected one (where it came from and what was
made from it), its eval results; quantize, evaluate (as jobs) and export (a signed bundle)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static, Tree

from appliance import api
from appliance.tui import actions
from appliance.tui.forms import Field, FormDialog
from appliance.tui.pages import Page


def model_rows(vault) -> list[dict]:
    rows = [{"id": m["id"], "kind": m["kind"], "made": f"{m['stage'] or 'import'}/{m['method'] or '-'}"}
            for m in api.train_models(vault)["models"]]
    return rows + [{"id": g["id"], "kind": "gguf", "made": f"{g['type']}{' flagged' if g['flagged'] else ''}"}
                   for g in api.quantize_list(vault)["gguf"]]


def evals_of(vault, node_id: str) -> list[dict]:
    return [r for r in api.eval_runs(vault)["runs"] if r.get("model") == node_id]


def deployments_of(vault, node_id: str) -> list[str]:
    """One line per deployment serving `node_id` or trying it as its candidate: the split and the A/B verdict."""
    lines = []
    for d in api.deploy_list(vault)["deployments"]:
        if node_id not in (d["model"], d["candidate"]):
            continue
        role = "in service" if d["model"] == node_id else f"candidate on {d['split']:.0%} (vs {d['model']})"
        trial = f"; candidate {d['candidate']} on {d['split']:.0%}" if d["model"] == node_id and d["candidate"] else ""
        verdict = f"; A/B: {d['verdict']['verdict']}" if d.get("verdict") else ""
        lines.append(f"deployment {d['name']}: {role}{trial}{verdict}; {d['records']} records")
    return lines


def sent(vault) -> dict[str, list[dict]]:
    """Bundles exported, oldest first, by the lineage id they carry."""
    out: dict[str, list[dict]] = {}
    for b in reversed(api.bundle_history(vault)["bundles"]):
        if b["way"] == "out":
            out.setdefault(b["id"], []).append(b)
    return out


class ModelsScreen(Page):
    MODE = "models"
    REFRESH_EVERY = 3.0  # jobs add GGUFs and eval runs while the screen is open
    BINDINGS = actions.bindings("models")

    def __init__(self):
        super().__init__()
        self.selected: str | None = None

    def compose_page(self) -> ComposeResult:
        with Horizontal():
            yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
            with Vertical(id="model-detail"):
                yield Tree("lineage", id="lineage")
                yield Static("", id="evals", markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#models", DataTable).add_columns("id", "kind", "made by")

    def load(self, vault) -> list[dict]:
        return model_rows(vault)

    def show(self, rows: list[dict]) -> None:
        t = self.query_one("#models", DataTable)
        ids = [r["id"] for r in rows]
        if ids == [str(k.value) for k in t.rows]:  # same list: keep the cursor, refresh what is shown
            if self.selected:
                self._load_detail(self.selected)
            return
        t.clear()
        for r in rows:
            t.add_row(r["id"], r["kind"], r["made"], key=r["id"])
        if self.selected in ids:
            t.move_cursor(row=ids.index(self.selected))
        if not rows:
            self.query_one("#evals", Static).update("no models yet: train one on the Train screen")

    @on(DataTable.RowHighlighted, "#models")
    def model_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key and event.row_key.value:
            self.selected = event.row_key.value
            self._load_detail(self.selected)

    @work(thread=True, exclusive=True, group="detail")
    def _load_detail(self, node_id: str) -> None:
        got = self.app.with_vault(lambda v: (api.lineage(v, node_id)["lineage"],
                                             api.lineage_descendants(v, node_id)["made"],
                                             evals_of(v, node_id), sent(v), deployments_of(v, node_id)),
                                  quiet=True)
        if got:
            self.app.call_from_thread(self._show_detail, *got)

    def _show_detail(self, ancestors: dict, made: list[dict], evals: list[dict], bundles: dict,
                     deployed: list[str] = ()) -> None:
        tree = self.query_one("#lineage", Tree)
        tree.clear()
        tree.root.set_label(Text(f"{ancestors['id']} ({ancestors['kind']})"))
        came = tree.root.add("came from", expand=True)

        def up(node, t):
            for p in t["parents"]:
                up(node.add(Text(f"{p['id']} ({p['kind']}) [{p['role']}]"), expand=True), p)

        def shipped(node, node_id):
            for b in bundles.get(node_id, []):
                node.add_leaf(Text(f"bundle {b['name']} v{b['version']} -> {b['file']}"))

        def down(node, items):
            for c in items:
                child = node.add(Text(f"{c['id']} ({c['kind']})"), expand=True)
                shipped(child, c["id"])
                down(child, c["children"])

        up(came, ancestors)
        made_node = tree.root.add("made from it", expand=True)
        shipped(made_node, ancestors["id"])
        down(made_node, made)
        tree.root.expand()
        lines = [f"{e['id']}: {e['suite']}  {e['passed']}/{e['cases']} passed"
                 + "".join(f"  {k} {v:.4g}" for k, v in e.get("metrics", {}).items()
                           if isinstance(v, float) and not k.endswith("_tokens"))[:120] for e in evals]
        text = "eval runs:\n" + "\n".join(lines) if lines else "no eval runs"
        self.query_one("#evals", Static).update("\n".join([*deployed, text]))  # deployments first: they are live

    def _need(self) -> str | None:
        if self.selected is None:
            self.notify("select a model first", severity="warning")
        return self.selected

    # --- actions --------------------------------------------------------------------------------
    def action_quantize(self) -> None:
        if model := self._need():
            self.app.push_screen(FormDialog(f"Quantize {model}", [
                Field("type", "Type", "choice", api.quantize_types(), "q4_k_m"),
                Field("imatrix", "Importance matrix data (DATASET@N, optional)")], ok="Queue"),
                lambda f: f and self._job("quantize", lambda v: api.jobs_quantize(v, model, f["type"],
                                                                                   f["imatrix"] or None)))

    def action_evaluate(self) -> None:
        if model := self._need():
            suites = sorted(Path(s["path"]).stem for s in api.eval_suites()["suites"])
            self.app.push_screen(FormDialog(f"Evaluate {model}", [
                Field("suite", "Suite: a shipped name, a TOML file, or DATASET@N", value=suites[0] if suites else "")],
                ok="Queue"), lambda f: f and self._job("eval", lambda v: api.jobs_eval(v, f["suite"], model)))

    @work(thread=True, group="submit")
    def _job(self, kind: str, submit) -> None:
        job = self.app.with_vault(submit, write=True)
        if job:
            started = job["status"] != "queued"
            self.app.call_from_thread(self.notify, f"{job['id']} {'started' if started else 'queued'}: {kind}; "
                                                   "see the Dashboard")

    def action_export(self) -> None:
        if model := self._need():
            export_dialog(self, model)


SIGNED_ONLY = "(nobody: signed only)"


def export_dialog(page, ref: str = "") -> None:
    """Ask what to bundle, the signing key, whom to encrypt to (a trusted site, and/or public key files) and
    where to write."""
    keys = [k["name"] for k in api.keys_list_at(page.app.home)["keys"]]
    sites = [SIGNED_ONLY, *(t["name"] for t in api.trust_list_at(page.app.home)["trusted"])]
    if not keys:
        page.notify("no signing key yet: create one on the Bundles screen (n)", severity="warning")
        return
    page.app.push_screen(FormDialog("Export a signed bundle", [
        Field("ref", "What: model, MODEL:TYPE, DATASET@N or eval run", value=ref),
        Field("key", "Signing key", "choice", keys, keys[0]),
        Field("to", "Encrypt to a trusted site", "choice", sites, SIGNED_ONLY),
        Field("recipients", "and/or to public key files, comma-separated"),
        Field("out", "Bundle file to write", value=f"{ref.replace(':', '-').replace('@', '-') or 'bundle'}.bundle"),
        Field("passphrase", "Signing key passphrase", "password")], ok="Export"),
        lambda f: f and _export(page, f))


@work(thread=True, group="export")
def _export(page, form: dict) -> None:
    recipients: list = [Path(n.strip()).expanduser() for n in form["recipients"].split(",") if n.strip()]
    sites = [form["to"]] if form["to"] not in ("", SIGNED_ONLY) else []

    def go(v):
        with api.using_key_passphrase(form["passphrase"]):
            return api.bundle_export(v, form["ref"], form["key"], Path(form["out"]).expanduser().absolute(),
                                     recipients, to_sites=sites)

    res = page.app.with_vault(go, write=True, wait=30)
    if res:
        page.app.call_from_thread(page.notify, f"{res['id']} -> {res['out']} (version {res['version']}"
                                               f"{', encrypted' if res['encrypted_to'] else ''})")
