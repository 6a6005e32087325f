"""Models in service: deployments, the A/B server with sealed serving records, feedback, and the comparison
and drift of what was served."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path


def deploy_spec(name: str, model: str, candidate: str | None = None, split: float = 0.0, record: bool = False,
                sample_rate: float = 1.0, retention_days: int = 30):
    """A deployment's settings, checked (every problem in one usage error) before a vault is opened."""
    from appliance.serving.store import Deployment

    return Deployment(name, model, candidate, split, record, sample_rate, retention_days)


def deploy_create(v, name: str, model: str, candidate: str | None = None, split: float = 0.0, record: bool = False,
                  sample_rate: float | None = None, retention_days: int | None = None,
                  probes: str | None = None, probe_count: int = 20) -> dict:
    """Create or update deployment `name` (`appliance deploy create --json`); its GGUFs must be found.
    `sample_rate` and `retention_days` left None keep the deployment's (default 1.0 and 30). `probes`
    (a dataset version) fixes the probe set (`probe_count` probes) `eval drift --deployment` replays on its
    models."""
    from appliance import refs
    from appliance.quantize import infer
    from appliance.serving import drift, store

    old = store.find(v.con, name)
    sample_rate = sample_rate if sample_rate is not None else old.sample_rate if old else 1.0
    retention_days = retention_days if retention_days is not None else old.retention_days if old else 30
    d = deploy_spec(name, model, candidate, split, record, sample_rate, retention_days)
    for ref in filter(None, (d.model, d.candidate)):
        infer.locate(ref, v.home.artifacts)
    if probes is not None:
        refs.dataset(v.con, probes)  # before anything is written
    res = {"deployment": store.put(v, d).to_json()}
    if probes is not None:
        drift.set_probes(v, name, probes, probe_count)
    return {**res, "probes": drift.described(v.con, name)}


def deploy_list(v) -> dict:
    """Every deployment with its record and feedback counts (`appliance deploy list --json`)."""
    from appliance.serving import store

    return {"deployments": [{**d.to_json(), **store.counts(v.con, d.name)} for d in store.all_deployments(v.con)]}


def deploy_show(v, name: str) -> dict:
    from appliance.serving import drift, store

    d = store.get(v.con, name)
    return {"deployment": d.to_json(), **store.counts(v.con, name), "probes": drift.described(v.con, name)}


def deploy_records(v, name: str, limit: int = 50, offset: int = 0, text: bool = False) -> dict:
    """A deployment's serving records, newest first; `text` adds the scrubbed messages and answers."""
    from appliance.serving import store

    total, rows = store.records(v.con, name, limit, offset, text)
    return {"deployment": name, "total": total, "offset": offset, "records": rows}


def deploy_delete_record(v, record_id: str) -> dict:
    """Erase one serving record and its feedback (audited with the id only)."""
    from appliance.serving import store

    return store.delete_record(v, record_id)


def _scrub(v) -> Callable[[str], tuple[str, dict]]:
    """The vault's scrubber under the site's policy (HOME/pii-policy.toml), placeholders as in `redact`."""
    from appliance.vault.pii import Scrubber, site_policy

    return Scrubber("redact", v.secrets.pseudonym_key, types=site_policy(v.home.root)).scrub


def feedback_add(v, record_id: str, rating: int | None = None, correction: str | None = None) -> dict:
    """A rating (1..5) and/or a corrected answer for a recorded response (`appliance feedback ID --json`)."""
    from appliance.serving import feedback

    return feedback.add(v, record_id, rating, correction, _scrub(v))


def feedback_export(v, deployment: str, name: str, validation: float = 0.05) -> dict:
    """A dataset version of a deployment's corrections: SFT rows and DPO preference pairs."""
    from appliance.api.data import validate_dataset_name
    from appliance.serving import feedback

    return feedback.export(v, deployment, validate_dataset_name(name), validation)


def deploy_compare(v, deployment: str, min_requests: int = 30, tolerances: dict[str, float] | None = None,
                   max_latency_increase: float | None = None, suites: Sequence[str] | None = None) -> dict:
    """The comparison `eval_ab` makes, read only: nothing kept, nothing promoted (for agents). `suites` (names
    or TOML files; None: every shipped suite) score the served answers that match their cases."""
    from appliance.serving import ab, scores

    return ab.compare(v.con, deployment, min_requests, tolerances, max_latency_increase,
                      scores.suites(suites))


def eval_ab(v, deployment: str, min_requests: int = 30, tolerances: dict[str, float] | None = None,
            max_latency_increase: float | None = None, promote: bool = False,
            suites: Sequence[str] | None = None) -> dict:
    """The model in service against its candidate on what they served, with a verdict ("passed"); with
    `promote`, a passing candidate becomes the deployment's model. Needs a writable vault (the verdict is
    kept for the console). Served answers that match a case of `suites` (None: every shipped suite) or carry
    a reference answer are scored with the suites' metrics (`accuracy:SUITE`, gated like the refusal rate)."""
    from appliance.serving import store

    res = deploy_compare(v, deployment, min_requests, tolerances, max_latency_increase, suites)
    verdict = {k: res[k] for k in ("verdict", "reason", "model", "candidate")}
    with v.transaction() as con:
        store.set_verdict(con, deployment, verdict)
        v.audit("eval.ab", [deployment, res["model"], res["candidate"]], {"verdict": res["verdict"]})
    if promote and res["passed"]:
        store.promote(v, deployment, verdict)
        res["promoted"] = True
    return res


def eval_drift_served(v, deployment: str, window: str = "7d", limits: dict[str, float] | None = None,
                      min_records: int = 20, plot: str | Path | None = None, now: datetime | None = None) -> dict:
    """A deployment's recent window of served requests against the window before it, and its probe set
    replayed on its models against the replay of a window ago ("ok" false on drift); `plot` writes a PNG of
    the measures against their limits (numbers only). `now` ends the recent window (default: now)."""
    from appliance.serving import drift

    span = drift.parse_window(window)
    replayed = drift.replay(v, deployment, span, now)
    res = drift.check(v.con, deployment, span, limits, min_records, now, replayed)
    if plot is not None:
        from appliance.eval.plots import served_drift_png

        served_drift_png(res, Path(plot))
        res["plot"] = str(plot)
    if not v.read_only:
        with v.transaction():
            v.audit("eval.drift.served", [deployment], {"drifted": res["drifted"], "enough": res["enough"],
                                                        "replayed": replayed["measured"]})
    return res


def serve_deployment(v, name: str, host: str = "127.0.0.1", port: int = 8000, n_ctx: int = 0, threads: int = 0,
                     api_key: str | None = None, cors_origins: Sequence[str] = (), flush_records: int = 64,
                     flush_seconds: float = 5.0, on_ready: Callable[[str], None] | None = None,
                     stop=None) -> dict:
    """Serve deployment `name` (its model, and its candidate on its split) until interrupted, recording when
    it says so. The vault is let go while serving and attached only to write a batch. Returns the totals.
    `stop` (a threading.Event) ends it from another thread, as Ctrl-C does."""
    from appliance.quantize import infer
    from appliance.serving import server, store
    from appliance.serving.recorder import Recorder

    d = store.get(v.con, name)
    arms = [server.Arm("model", d.model, infer.locate(d.model, v.home.artifacts))]
    if d.candidate:
        arms.append(server.Arm("candidate", d.candidate, infer.locate(d.candidate, v.home.artifacts)))
    recorder = None
    if d.record:
        def write(records, feedback):
            with v.session(wait=60):
                return store.write(v, records, feedback)

        def exists(rid):
            with v.session(wait=10):
                return store.record_exists(v.con, rid, name)

        recorder = Recorder(name, _scrub(v), write, d.sample_rate, flush_records, flush_seconds, exists)
    with v.released():
        return server.serve(name, arms, d.split, host, port, n_ctx, threads, api_key, cors_origins, recorder,
                            on_ready or (lambda url: None), stop)


def serve_ab(model: str | Path, candidate: str | Path | None = None, split: float = 0.0, host: str = "127.0.0.1",
             port: int = 8000, n_ctx: int = 0, threads: int = 0, api_key: str | None = None,
             cors_origins: Sequence[str] = (), name: str | None = None, home: str | Path | None = None,
             on_ready: Callable[[str], None] | None = None) -> None:
    """Serve a GGUF, and a candidate on a share `split` of conversations, without a vault (nothing recorded)."""
    from appliance.api.serving import gguf_locate
    from appliance.serving import server

    if candidate is None and split:
        from appliance.errors import UsageError

        raise UsageError("--split needs --candidate", "name the model on trial with --candidate")
    arms = [server.Arm("model", _served_name(model), gguf_locate(str(model), home))]
    if candidate is not None:
        arms.append(server.Arm("candidate", _served_name(candidate), gguf_locate(str(candidate), home)))
    server.serve(name or arms[0].name, arms, split, host, port, n_ctx, threads, api_key, cors_origins, None,
                 on_ready or (lambda url: None))


def _served_name(ref: str | Path) -> str:
    p = Path(ref)
    return p.stem if str(ref).endswith(".gguf") or "/" in str(ref) else str(ref)
