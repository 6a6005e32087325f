"""Train: pick data, recipe and method, launch a job; watch its loss curve, tokens/s and ETA; stop, resume.

Runs are jobs (`api.jobs_submit`): they go on when the console closes and are listed here when it reopens. Runs
started from the CLI (or the API) are listed too, after the jobs, with their loss curves.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Select, Static

from appliance import api
from appliance.errors import VaultError
from appliance.tui import actions, fmt
from appliance.tui.pages import Page, fill
from appliance.tui.plot import LinePlot

METHODS = ["recipe's own", "full", "lora", "qlora"]


def launch_spec(recipe: str, dataset: str | None, method: str, steps: str) -> dict:
    """The form's choices as a job spec: recipe overrides, the same the CLI takes."""
    overrides = []
    if dataset:
        overrides.append(f"data.datasets={dataset}")
    if method in ("full", "lora", "qlora"):
        overrides.append(f"method={method}")
    if steps.strip():
        overrides.append(f"train.max_steps={steps.strip()}")
    return {"recipe": recipe, "overrides": overrides}


def run_progress(vault, run: dict, running: bool) -> dict:
    """The live numbers of a run (as `api.train_runs` lists it): losses, step of max, tokens/s and an ETA."""
    try:
        m = api.train_metrics(vault, run["id"])["metrics"]
    except VaultError:  # no step recorded yet
        m = []
    step, max_steps = run["step"], run["max_steps"]
    recent = [x["tokens_per_s"] for x in m[-10:]]
    tps = sum(recent) / len(recent) if recent else None
    per_step = m[-1]["elapsed"] / max(1, len(m)) if m else None
    eta = per_step * (max_steps - step) if per_step and running else None
    vals = [x["val_loss"] for x in m if x["val_loss"] is not None]
    return {"run": run["id"], "losses": [x["loss"] for x in m], "step": step, "max_steps": max_steps,
            "status": run["status"], "tokens_per_s": tps, "eta": eta, "loss": m[-1]["loss"] if m else None,
            "val_loss": vals[-1] if vals else None}


def listing(jobs: list[dict], runs: list[dict]) -> list[dict]:
    """One row per training job (as `api.jobs_list` lists it), then one per run started elsewhere (the CLI,
    the API), newest first."""
    rows = [{"key": j["id"], "job": j["id"], "status": j["status"], "what": api.jobs_describe(j["kind"], j["spec"]),
             "run": j["ref"], "running": j["status"] == "running"} for j in jobs]
    by_jobs = {j["ref"] for j in jobs if j["ref"]}
    rows += [{"key": r["id"], "job": "cli", "status": r["status"], "what": f"{r['stage']}/{r['method']}",
              "run": r["id"], "running": r["status"] == "running"}
             for r in reversed(runs) if r["id"] not in by_jobs][:50]
    return rows


class TrainScreen(Page):
    MODE = "train"
    REFRESH_EVERY = 1.0
    BINDINGS = actions.bindings("train")

    def __init__(self):
        super().__init__()
        self.selected: str | None = None
        self.options_loaded = False
        self.cli_runs: set[str] = set()  # rows of runs started outside the console: no stop or resume here

    def compose_page(self) -> ComposeResult:
        with Horizontal(classes="form"):
            yield Select([], prompt="dataset", id="dataset", compact=True)
            yield Select([], prompt="recipe", id="recipe", compact=True)
            yield Select([(m, m) for m in METHODS], value=METHODS[0], allow_blank=False, id="method", compact=True)
            yield Input(placeholder="steps", id="steps", type="integer", compact=True)
            yield Input(placeholder="gpus", id="gpus", type="integer", compact=True)
        yield DataTable(id="train-jobs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="train-stats", markup=False)
        yield LinePlot(id="loss-plot")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#train-jobs", DataTable).add_columns("job", "status", "what", "run", "step", "loss")

    def load(self, vault) -> dict:
        everyone = api.jobs_list(vault, all=True, dispatch=False)["jobs"][:50]  # newest first
        jobs = [j for j in everyone if j["kind"] == "train"]
        runs = api.train_runs(vault)["runs"]  # every run, jobs' and the CLI's alike
        rows = listing(jobs, runs)
        chosen = next((x for x in rows if x["key"] == self.selected), rows[0] if rows else None)
        by_id = {r["id"]: r for r in runs}
        live = {x["key"]: run_progress(vault, by_id[x["run"]], x["running"])
                for x in rows[:10] + ([chosen] if chosen else []) if x["run"] in by_id}
        return {"jobs": jobs, "rows": rows, "live": live, "chosen": chosen["key"] if chosen else None,
                "datasets": [d["name"] for d in api.vault_datasets(vault)["datasets"]],
                "recipes": [] if self.options_loaded else [r["name"] for r in api.train_recipes()["recipes"]]}

    def show(self, data: dict) -> None:
        if not self.options_loaded:
            self.query_one("#dataset", Select).set_options([(d, d) for d in data["datasets"]])
            self.query_one("#recipe", Select).set_options([(r, r) for r in data["recipes"]])
            self.options_loaded = True
        t = self.query_one("#train-jobs", DataTable)
        self.cli_runs = {x["key"] for x in data["rows"] if x["job"] == "cli"}
        live = [data["live"].get(x["key"]) for x in data["rows"]]
        ids = [x["key"] for x in data["rows"]]
        fill(t, [(x["job"], x["status"], x["what"], x["run"] or "", f"{p['step']}/{p['max_steps']}" if p else "",
                  f"{p['loss']:.4f}" if p and p["loss"] is not None else "") for x, p in zip(data["rows"], live)], ids)
        if data["chosen"] in ids:  # the selection follows the job, not the row number
            t.move_cursor(row=ids.index(data["chosen"]))
        p = data["live"].get(data["chosen"]) if data["chosen"] else None
        stats = self.query_one("#train-stats", Static)
        if p:
            loss = "-" if p["loss"] is None else f"{p['loss']:.4f}"
            if p["val_loss"] is not None:
                loss += f" (val {p['val_loss']:.4f})"
            who = p["run"] if data["chosen"] == p["run"] else f"{data['chosen']} {p['run']}"  # a CLI run: no job id
            stats.update(f"{who} ({p['status']}): step {p['step']}/{p['max_steps']}  "
                         f"loss {loss}  {fmt.rate(p['tokens_per_s'])}  ETA {fmt.seconds(p['eta'])}")
            self.query_one(LinePlot).set_values(p["losses"])
        else:
            stats.update("no training runs yet: choose a dataset and recipe, then launch" if not data["rows"] else "")
            self.query_one(LinePlot).set_values([])

    @on(DataTable.RowHighlighted, "#train-jobs")
    def job_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key and event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self.action_refresh()

    def _selected_job(self) -> str | None:
        if self.selected is None:
            self.notify("select a job first", severity="warning")
        elif self.selected in self.cli_runs:  # a run started from the CLI is not a job here
            self.notify(f"{self.selected} was started outside the console: stop it there (Ctrl-C); resume it with "
                        "`appliance train run RECIPE --resume`", severity="warning")
            return None
        return self.selected

    # --- launch, stop, resume -------------------------------------------------------------------
    def action_launch(self) -> None:
        recipe = self.query_one("#recipe", Select).value
        if recipe is Select.BLANK:
            self.notify("choose a recipe first", severity="warning")
            return
        dataset = self.query_one("#dataset", Select).value
        spec = launch_spec(str(recipe), None if dataset is Select.BLANK else str(dataset),
                           str(self.query_one("#method", Select).value), self.query_one("#steps", Input).value)
        gpus = self.query_one("#gpus", Input).value.strip()
        self._submit(spec, int(gpus) if gpus else 0)

    @work(thread=True, group="submit")
    def _submit(self, spec: dict, gpus: int) -> None:
        job = self.app.with_vault(lambda v: api.jobs_submit(v, spec["recipe"], spec["overrides"], gpus), write=True)
        if job:
            self.selected = job["id"]
            started = job["status"] != "queued"
            self.app.call_from_thread(self.notify, f"{job['id']} {'started' if started else 'queued'}")
            self.app.call_from_thread(self.action_refresh)

    def action_stop(self) -> None:
        if job_id := self._selected_job():
            self._job_op("cancel", job_id)

    def action_resume(self) -> None:
        if job_id := self._selected_job():
            self._job_op("resume", job_id)

    @work(thread=True, group="submit")
    def _job_op(self, op: str, job_id: str) -> None:
        job = self.app.with_vault(lambda v: (api.jobs_cancel if op == "cancel" else api.jobs_resume)(v, job_id),
                                  write=True)
        if job:
            self.selected = job["id"]
            what = {"cancel": "asked to stop" if job["status"] == "running" else job["status"]}.get(op, "resumes as")
            self.app.call_from_thread(self.notify, f"{job_id} {what}" + (f" {job['id']}" if op == "resume" else ""))
            self.app.call_from_thread(self.action_refresh)
