"""Models in service: deployments, sealed serving records, feedback, the A/B comparison and served drift.

The fast tests write serving records through the recorder (as the server does) into a fresh vault; the slow
one serves two GGUFs through the real server and talks to it with the official `openai` client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import PY, copy_home, open_vault, python_env
from tests.servers import free_port, start_server
from tests.test_agents import _call, _refused, _session  # mcp's stdio client binds stderr when imported

EMAIL, SSN = "jane.roe@example.org", "512-44-7391"


def _recorder(v, name: str, **kw):
    from appliance.serving import store
    from appliance.serving.recorder import Recorder
    from appliance.vault.pii import Scrubber

    return Recorder(name, Scrubber("redact").scrub, lambda r, f: store.write(v, r, f), **kw)


def _served(rec, n: int, model: str, arm: str, answer: str, prefix: str = "q") -> list[str]:
    from appliance.serving.server import new_id

    ids = []
    for i in range(n):
        rid = new_id()
        rec.add(rid, arm, model, [{"role": "user", "content": f"{prefix} {i}: what does the tarn valve do?"}],
                answer, {"prompt_tokens": 9, "completion_tokens": 5 + i % 3}, 10.0 + i, "ok", "stop")
        ids.append(rid)
    return ids


def test_routing_is_sticky_and_takes_the_split():
    from appliance.serving import router

    keys = [router.sticky_key(f"user-{i}", None, None) for i in range(4000)]
    arms = [router.arm("site", k, 0.1, True) for k in keys]
    assert arms == [router.arm("site", k, 0.1, True) for k in keys]  # the same key, the same arm
    assert 0.07 < arms.count("candidate") / len(arms) < 0.13
    assert {router.arm("site", k, 0.5, False) for k in keys} == {"model"}  # no candidate: the model answers
    assert router.sticky_key(None, "key", "10.0.0.1") == "key:key"
    assert router.sticky_key("", None, "10.0.0.1") == "client:10.0.0.1"


def test_the_vault_less_ab_server_loads_neither_torch_nor_duckdb():
    code = ("import sys; import appliance.cli.entry; from appliance.serving import server; "
            "from appliance.api import serve_ab; "
            "app = server.build_app('d', {}, 0.0, None, None, []); "
            "assert 'torch' not in sys.modules and 'duckdb' not in sys.modules, 'heavy import'")
    r = subprocess.run([PY, "-c", code], env=python_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_recorder_scrubs_buffers_and_writes_in_batches(home, cli):
    r = cli("--home", home, "--json", "deploy", "create", "site", "--model", "a.gguf", "--candidate", "b.gguf",
            "--split", "0.5", "--record", "--retention-days", "7")
    assert r.code == 0, r.err
    assert r.json["deployment"]["record"] and r.json["deployment"]["split"] == 0.5
    with open_vault(home) as v:
        rec = _recorder(v, "site", flush_records=3, flush_seconds=3600)
        rec.add("chatcmpl-" + "0" * 24, "model", "a.gguf",
                [{"role": "user", "content": f"Mail {EMAIL}, SSN {SSN}"}], f"Noted: {EMAIL}", {}, 5.0, "ok", "stop")
        assert rec.waiting == 1  # in memory until a batch is due
        assert rec.feedback("chatcmpl-" + "0" * 24, 4, f"write to {EMAIL}")
        assert not rec.feedback("chatcmpl-" + "1" * 24, 4, None)  # not a response it recorded
        assert rec.flush() == {"records": 1, "feedback": 1, "expired": 0}
        row = v.con.execute("SELECT messages, answer, pii FROM serving_records").fetchone()
        assert EMAIL not in row[0] + row[1] and SSN not in row[0] and "[EMAIL]" in row[0] and "[SSN]" in row[0]
        assert json.loads(row[2]) == {"EMAIL": 2, "SSN": 1}
        assert v.con.execute("SELECT correction FROM serving_feedback").fetchone()[0] == "write to [EMAIL]"
        # retention: a record older than the deployment's 7 days goes at the next write
        v.con.execute("UPDATE serving_records SET created = created - INTERVAL 8 DAY")
        _served(rec, 1, "a.gguf", "model", "fine")
        assert rec.flush()["expired"] == 1
        assert v.con.execute("SELECT count(*) FROM serving_feedback").fetchone()[0] == 0
    r = cli("--home", home, "--json", "deploy", "show", "site")
    assert r.json["records"] == 1 and r.json["deployment"]["retention_days"] == 7
    r = cli("--home", home, "--json", "deploy", "list")
    assert [(d["name"], d["records"]) for d in r.json["deployments"]] == [("site", 1)]


def test_ab_feedback_export_promote_drift_and_erasure(home, cli):
    from appliance.db_time import utcnow
    from appliance.serving import store

    assert cli("--home", home, "deploy", "create", "site", "--model", "a.gguf", "--candidate", "b.gguf", "--split",
               "0.5", "--record").code == 0
    with open_vault(home) as v:
        rec = _recorder(v, "site", flush_records=1000)
        a = _served(rec, 12, "a.gguf", "model", "It opens the relief line.")
        b = _served(rec, 12, "b.gguf", "candidate", "I'm sorry, I can't help with that.")
        rec.close()
    # a candidate that refuses: the verdict fails, exit 1, nothing promoted
    r = cli("--home", home, "--json", "eval", "ab", "site", "--min-requests", "10", "--promote")
    assert r.code == 1 and r.json["ok"] is False and r.json["verdict"] == "fail"
    assert r.json["metrics"]["refusal_rate"]["delta"] == 1.0 and r.json["promoted"] is False
    assert [x["metric"] for x in r.json["regressions"]] == ["refusal_rate"]
    assert cli("--home", home, "--json", "deploy", "show", "site").json["deployment"]["model"] == "a.gguf"
    # too few requests: no verdict either way
    r = cli("--home", home, "--json", "eval", "ab", "site", "--min-requests", "50")
    assert r.code == 1 and r.json["verdict"] == "insufficient"
    # feedback: the short form and `add`; ratings enter the comparison
    r = cli("--home", home, "feedback", a[0], "--rating", "2", "--correction", f"It relieves pressure; ask {EMAIL}.")
    assert r.code == 0 and "feedback recorded" in r.out
    assert cli("--home", home, "--json", "feedback", "add", b[0], "--rating", "1").json["correction"] is False
    assert cli("--home", home, "feedback", "chatcmpl-" + "9" * 24, "--rating", "3").code == 2
    assert cli("--home", home, "feedback", "nonsense", "--rating", "3").code == 2
    r = cli("--home", home, "--json", "feedback", "export", "site", "--name", "site-feedback")
    assert r.code == 0, r.err
    assert r.json["version"] == "site-feedback@1" and r.json["rows"] == 1 and r.json["models"] == ["a.gguf"]
    with open_vault(home, read_only=True) as v:
        row = v.con.execute(f"SELECT instruction, response, chosen, rejected FROM {r.json['table']}").fetchone()
    assert row == ("q 0: what does the tarn valve do?", "It relieves pressure; ask [EMAIL].",
                   "It relieves pressure; ask [EMAIL].", "It opens the relief line.")
    # the same candidate, now answering: it passes and is promoted
    with open_vault(home) as v:
        v.con.execute("UPDATE serving_records SET answer = 'It opens the relief line too.' WHERE model = 'b.gguf'")
    r = cli("--home", home, "--json", "eval", "ab", "site", "--min-requests", "10", "--promote",
            "--tolerance", "rating=2")
    assert r.code == 0, r.out
    assert r.json["verdict"] == "pass" and r.json["promoted"] is True
    assert r.json["arms"]["model"]["ratings"] == 1 and r.json["metrics"]["rating"]["delta"] == -1.0
    d = cli("--home", home, "--json", "deploy", "show", "site").json["deployment"]
    assert (d["model"], d["candidate"], d["split"], d["verdict"]["verdict"]) == ("b.gguf", None, 0.0, "pass")
    assert cli("--home", home, "eval", "ab", "site").code == 2  # no candidate left to compare
    # drift: the earlier window asked about valves, the recent one about something else entirely
    with open_vault(home) as v:
        v.con.execute("UPDATE serving_records SET created = created - INTERVAL 36 HOUR")
        now = utcnow()
        recent = [store.Served(f"chatcmpl-{i:024x}", "site", "model", "b.gguf", now - timedelta(hours=1),
                               json.dumps([{"role": "user", "content": "Reset my badge password for building nine"}]),
                               "Done.", 43, 9, 2, 12.0, "ok", "stop", {}) for i in range(24)]
        store.write(v, recent, [])
    r = cli("--home", home, "--json", "eval", "drift", "--deployment", "site", "--window", "1d", "--min-records", "10",
            "--plot", home.parent / "drift.png")
    assert r.code == 1 and r.json["ok"] is False and r.json["enough"]
    assert (home.parent / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert {"js_divergence", "unseen_rate"} <= set(r.json["drifted"]) and r.json["metrics"]["unseen_rate"] == 1.0
    assert r.json["replay"]["measured"] is False and "no probe set" in r.json["replay"]["reason"]  # a path: no lineage
    r = cli("--home", home, "--json", "eval", "drift", "--deployment", "site", "--window", "30m")
    assert r.code == 0 and r.json["enough"] is False  # nothing in either window: not judged
    assert cli("--home", home, "eval", "drift", "--deployment", "site", "--window", "soon").code == 2
    assert cli("--home", home, "eval", "drift").code == 2
    # erasure: the record and its feedback go; the audit log says so, by id only
    r = cli("--home", home, "--json", "deploy", "delete-record", a[0])
    assert r.json == {"ok": True, "schema": 1, "id": a[0], "deployment": "site", "deleted": True,
                      "feedback_deleted": 1}
    assert cli("--home", home, "deploy", "delete-record", a[0]).code == 2
    r = cli("--home", home, "--json", "deploy", "records", "site", "--limit", "5", "--text")
    assert r.json["total"] == 47 and a[0] not in [x["id"] for x in r.json["records"]]
    assert r.json["records"][0]["messages"][0]["role"] == "user"
    log = cli("--home", home, "--json", "audit", "log", "--limit", "50").json
    assert any(e["action"] == "serve.record.delete" and a[0] in e["ids"] for e in log["entries"])
    assert cli("--home", home, "--json", "audit", "verify").json["ok"]


def test_deployment_settings_are_checked_before_the_passphrase(home, cli, monkeypatch):
    monkeypatch.delenv("APPLIANCE_PASSPHRASE")
    r = cli("--home", home, "deploy", "create", "bad name", "--model", "a.gguf", "--split", "0.2")
    assert r.code == 2 and "letters, digits" in r.err and "--split needs --candidate" in r.err
    assert cli("--home", home, "serve", "--record", "--model", "a.gguf").code == 2  # needs --deployment
    assert cli("--home", home, "serve", "a.gguf", "--model", "b.gguf").code == 2
    r = cli("--home", home, "serve", "--model", "a.gguf", "--host", "0.0.0.0")
    assert r.code == 2 and "without an API key" in r.err


# --- the real server, two GGUFs, the openai client ------------------------------------------------------------
@pytest.fixture(scope="module")
def served_home(train_base, tmp_path_factory) -> tuple[Path, str, str]:
    """train_base plus a tiny model `sv@1` exported twice: q8_0 (the model in service) and f16 (the candidate)."""
    from appliance import api
    from appliance.train.config import load_recipe
    from appliance.train.run import run

    h = copy_home(train_base, tmp_path_factory.mktemp("served"))
    with open_vault(h) as v:
        run(v, load_recipe("tiny-dense", ["name=sv", "train.max_steps=4", "train.checkpoint_every=1000",
                                          "train.warmup_steps=1"]))
        a = api.quantize(v, "sv@1", "q8_0", eval_tokens=128)["id"]
        b = api.quantize(v, "sv@1", "f16", eval_tokens=128)["id"]
    return h, a, b


def _post(url: str, payload: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                continue
            data = p.read_bytes()
            found += [f"{p}: {n!r}" for n in needles if n in data]
    return found


@pytest.mark.slow
def test_ab_serving_end_to_end_with_the_openai_client(served_home, cli, tmp_path):
    from openai import OpenAI

    src, a, b = served_home
    home = copy_home(src, tmp_path)
    port = free_port()
    env = {**python_env(), "APPLIANCE_HOME": str(home)}
    proc = start_server(["serve", "--deployment", "site", "--model", a, "--candidate", b, "--split", "0.5", "--record",
                   "--flush-records", "4", "--flush-seconds", "1"], port, env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        client = OpenAI(base_url=base, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["site", a, b]
        seen: dict[str, set[str]] = {}
        ids = []
        for _ in range(2):
            for u in range(6):
                content = f"Hello from {EMAIL}, SSN {SSN}, about the tarn valve" if u == 0 else f"Question {u}"
                chat = client.chat.completions.create(model="site", messages=[{"role": "user", "content": content}],
                                                      max_tokens=4, temperature=0, user=f"user-{u}")
                assert chat.id.startswith("chatcmpl-") and chat.choices[0].message.role == "assistant"
                seen.setdefault(f"user-{u}", set()).add(chat.model)
                ids.append(chat.id)
        assert all(len(m) == 1 for m in seen.values())  # sticky per user
        assert set().union(*seen.values()) == {a, b}  # both arms answered
        pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="site", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
            user="user-1") if c.choices and c.choices[0].delta.content is not None]
        assert isinstance(pieces, list)
        comp = client.completions.create(model="site", prompt="The tarn valve", max_tokens=3, temperature=0,
                                         user="user-2")
        assert comp.id.startswith("cmpl-") and comp.model in (a, b) and comp.choices[0].text is not None
        code, body = _post(f"{base}/feedback", {"id": ids[0], "rating": 2, "correction": f"Ask {EMAIL} instead"})
        assert code == 200 and body["recorded"] is True
        assert _post(f"{base}/feedback", {"id": "chatcmpl-" + "0" * 24, "rating": 2})[0] == 404
        assert _post(f"{base}/feedback", {"id": ids[1], "rating": 9})[0] == 400
        # the server lets go of the vault between writes: a command gets in meanwhile
        assert cli("--home", home, "--json", "deploy", "show", "site").code == 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    r = cli("--home", home, "--json", "deploy", "records", "site", "--text", "--limit", "100")
    assert r.json["total"] == 14
    texts = json.dumps(r.json["records"])
    assert "[EMAIL]" in texts and "[SSN]" in texts and EMAIL not in texts and SSN not in texts
    assert cli("--home", home, "feedback", ids[1], "--rating", "4").code == 0
    r = cli("--home", home, "--json", "eval", "ab", "site", "--min-requests", "1")
    assert r.json["arms"]["model"]["requests"] + r.json["arms"]["candidate"]["requests"] == 14
    assert r.json["verdict"] in ("pass", "fail")
    r = cli("--home", home, "--json", "eval", "drift", "--deployment", "site", "--window", "7d")
    assert r.code == 0 and r.json["recent"]["records"] == 14 and r.json["earlier"]["records"] == 0
    assert r.json["replay"]["dataset"] == "handbook@1" and "first replay" in r.json["replay"]["reason"]
    r = cli("--home", home, "--json", "feedback", "export", "site", "--name", "served-fb")
    assert r.code == 0 and r.json["rows"] == 1 and r.json["parents"]
    # sealed: the raw strings are in no file under the home (vault, WAL, logs, artifacts, spill files)
    assert _files_holding(home, [EMAIL.encode(), SSN.encode()]) == []


def test_an_agent_reads_the_comparison_and_changes_nothing(home, cli):
    import asyncio

    assert cli("--home", home, "deploy", "create", "site", "--model", "a.gguf", "--candidate", "b.gguf", "--split",
               "0.5", "--record").code == 0
    with open_vault(home) as v:
        rec = _recorder(v, "site")
        _served(rec, 3, "a.gguf", "model", "It opens the relief line.")
        _served(rec, 3, "b.gguf", "candidate", "It opens the relief line.")
        rec.close()
    token = cli("--home", home, "--json", "grant", "--agent", "watcher", "--caps", "read").json["token"]

    async def body(s):
        listed = await _call(s, "deploy_list")
        compared = await _call(s, "deploy_compare", deployment="site", min_requests=2)
        missing = await _refused(s, "deploy_compare", deployment="nowhere")
        return listed, compared, missing

    listed, compared, missing = asyncio.run(_session(home, token, body))
    assert [d["name"] for d in listed["deployments"]] == ["site"]
    assert compared["verdict"] == "pass" and compared["arms"]["candidate"]["requests"] == 3
    assert "no deployment nowhere" in missing
    assert cli("--home", home, "--json", "deploy", "show", "site").json["deployment"]["verdict"] is None
    # the console's models screen names the deployments a model is in, with the split and the verdict
    from appliance.tui.models_screen import deployments_of

    assert cli("--home", home, "eval", "ab", "site", "--min-requests", "2").code == 0
    with open_vault(home, read_only=True) as v:
        assert deployments_of(v, "b.gguf") == ["deployment site: candidate on 50% (vs a.gguf); A/B: pass; 6 records"]
        assert deployments_of(v, "a.gguf") == ["deployment site: in service; candidate b.gguf on 50%; A/B: pass; "
                                               "6 records"]


@pytest.mark.slow
def test_ab_without_a_vault_keeps_the_key_rules_and_records_nothing(served_home, tmp_path):
    from openai import AuthenticationError, OpenAI

    src, a, b = served_home
    gguf = []
    for i, ref in enumerate((a, b)):  # the home's GGUFs are sealed: plain copies leave by an audited export
        out = tmp_path / f"plain-{i}"
        assert subprocess.run([PY, "-m", "appliance", "--home", str(src), "model", "export", ref, "--out", str(out)],
                              env=python_env(), capture_output=True).returncode == 0
        gguf += sorted(out.glob("*.gguf"))
    assert len(gguf) == 2
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    port = free_port()
    env = {**python_env(), "APPLIANCE_API_KEY_FILE": str(key_file)}
    env.pop("APPLIANCE_PASSPHRASE")  # no vault is opened
    proc = start_server(["serve", "--model", str(gguf[0]), "--candidate", str(gguf[1]), "--split", "1"], port, env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        client = OpenAI(base_url=base, api_key="s3cret-key", max_retries=0)
        chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert chat.model == gguf[1].stem  # split 1: every conversation on the candidate
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{base}/feedback", json.dumps({"id": chat.id, "rating": 3}).encode(),
                                     {"Content-Type": "application/json", "Authorization": "Bearer s3cret-key"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 404 and b"does not record" in e.value.read()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()


# --- one server start/stop, suite metrics on served answers, completions, output drift on replayed probes ------
def test_run_server_serves_until_stopped_cleans_up_and_names_a_busy_port():
    import socket
    import threading
    import urllib.request

    from fastapi import FastAPI

    from appliance.quantize.infer import run_server
    from appliance.quantize.types import QuantizeError

    app = FastAPI()

    @app.get("/v1/ping")
    def ping():
        return {"pong": True}

    port, stop, ready, cleaned = free_port(), threading.Event(), [], []
    worker = threading.Thread(target=run_server, args=(app, "127.0.0.1", port, ready.append, stop,
                                                       lambda: cleaned.append("server")))
    worker.start()
    try:
        for _ in range(600):  # until it listens (a bound on waiting, nothing timed)
            if ready:
                break
            stop.wait(0.05)
        assert ready == [f"http://127.0.0.1:{port}/v1"]
        with urllib.request.urlopen(f"{ready[0]}/ping", timeout=30) as r:
            assert json.loads(r.read()) == {"pong": True}
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive() and cleaned == ["server"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(QuantizeError, match=f"could not listen on 127.0.0.1:{busy}"):
            run_server(app, "127.0.0.1", busy, cleanup=lambda: cleaned.append("busy"))
    assert cleaned == ["server", "busy"]


def test_eval_ab_scores_served_answers_with_the_suites_and_references(home, cli):
    from appliance import api

    assert cli("--home", home, "deploy", "create", "site", "--model", "a.gguf", "--candidate", "b.gguf", "--split",
               "0.5", "--record").code == 0
    tarn = [{"role": "user", "content": "What does the  tarn valve do?"}]  # case and spacing aside, a suite case
    with open_vault(home) as v:
        rec = _recorder(v, "site", flush_records=1000)
        for i in range(12):
            for arm, model, answer in (("model", "a.gguf", "It isolates the secondary coolant circuit."),
                                       ("candidate", "b.gguf", "It opens the relief line.")):
                rid = f"chatcmpl-{i:012x}{model[0] * 12}"
                rec.add(rid, arm, model, tarn, answer, {"completion_tokens": 7}, 9.0, "ok", "stop")
        for i, (arm, model, answer) in enumerate((("model", "a.gguf", "The relief line opens."),
                                                  ("candidate", "b.gguf", "Mail it, then wait."),
                                                  ("candidate", "b.gguf", f"Mail {EMAIL} first."))):
            rec.add(f"chatcmpl-{i:024x}", arm, model, [{"role": "user", "content": "Who gets the form?"}], answer, {},
                    9.0, "ok", "stop", reference={"reference": f"mail {EMAIL}", "expect": "contains"})
        # a completion of a chat case's question is not that case; the suite's completion case is
        rec.add("cmpl-" + "1" * 24, "model", "a.gguf", [{"role": "prompt", "content": "What does the tarn valve do?"}],
                "It isolates the secondary coolant circuit.", {}, 9.0, "ok", "stop")
        rec.add("cmpl-" + "2" * 24, "candidate", "b.gguf",
                [{"role": "prompt", "content": "Reply with the status as JSON:"}], '{"status": "ok"}', {}, 9.0, "ok",
                "stop")
        rec.close()
        stored = json.loads(v.con.execute("SELECT messages FROM serving_records WHERE id = ?",
                                          [f"chatcmpl-{0:024x}"]).fetchone()[0])
    assert stored == [{"role": "user", "content": "Who gets the form?", "reference": "mail [EMAIL]",
                       "expect": "contains"}]  # the reference is kept with the question, scrubbed
    r = cli("--home", home, "--json", "eval", "ab", "site", "--min-requests", "10")
    assert r.code == 1 and r.json["verdict"] == "fail"
    assert {x["metric"] for x in r.json["regressions"]} == {"accuracy:handbook-answers", "accuracy:handbook-checks"}
    m, arms = r.json["metrics"], r.json["arms"]
    assert (m["accuracy:handbook-checks"]["model"], m["accuracy:handbook-checks"]["candidate"]) == (1.0, 1 / 13)
    assert m["accuracy:handbook-answers"]["delta"] == -1.0 and m["accuracy:handbook-answers"]["gated"]
    assert arms["model"]["scored"] == {"accuracy:handbook-answers": 12, "accuracy:handbook-checks": 12,
                                       "accuracy:reference": 1}
    assert arms["candidate"]["scored"]["accuracy:handbook-checks"] == 13  # 12 chats and the JSON completion
    assert (m["accuracy:reference"]["model"], m["accuracy:reference"]["candidate"]) == (0.0, 0.5)  # scrubbed alike
    # the suite's custom metric, by the eval registry's own function, on the answers scored under that suite
    words = m["mean_output_words:handbook-checks"]
    assert (words["model"], words["candidate"], words["gated"]) == (6.0, (12 * 5 + 2) / 13, False)
    r = cli("--home", home, "--json", "eval", "ab", "site", "--min-requests", "10", "--tolerance", "accuracy=1")
    assert r.code == 0 and r.json["verdict"] == "pass"
    with open_vault(home, read_only=True) as v:
        only = api.deploy_compare(v, "site", 10, suites=["handbook-checks"])
    assert only["suites"] == ["handbook-checks"] and "accuracy:handbook-answers" not in only["metrics"]


def test_a_completion_prompt_is_what_was_asked_and_replays_are_trimmed():
    from collections import Counter

    from appliance.serving import drift, feedback

    asked = [{"role": "system", "content": "Be brief"}, {"role": "prompt", "content": "The tarn valve"}]
    assert drift.words([{"messages": asked}]) == Counter({"the": 1, "tarn": 1, "valve": 1})  # input drift
    assert feedback._prompt(asked) == "The tarn valve"  # a correction's instruction
    replays = [{"model": "a" if i < 5 else "b", "at": str(i)} for i in range(100)]
    kept = drift._trim(replays)  # the first of every model version, then the newest
    assert [r["at"] for r in kept] == ["0", "5"] + [str(i) for i in range(40, 100)]


def test_completions_and_references_on_the_ab_server_through_the_openai_client(served_home, cli, tmp_path):
    from openai import BadRequestError, OpenAI
    from starlette.testclient import TestClient

    from appliance.quantize import infer
    from appliance.serving import router, server

    src, a, b = served_home
    home = copy_home(src, tmp_path)
    assert cli("--home", home, "deploy", "create", "site", "--model", a, "--candidate", b, "--split", "0.5",
               "--record").code == 0
    with open_vault(home) as v:
        arms = {x.arm: x for x in (server.Arm("model", a, infer.locate(a, v.home.artifacts)),
                                   server.Arm("candidate", b, infer.locate(b, v.home.artifacts)))}
        rec = _recorder(v, "site", flush_records=1000, flush_seconds=3600)
        try:
            for x in arms.values():
                x.llm = infer.open_model(x.path, 0, 1)
            with TestClient(server.build_app("site", arms, 0.5, rec, None, [])) as http:  # in process, no port
                client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
                served = {}
                for u in range(6):
                    comp = client.completions.create(model="site", prompt=f"The tarn valve {u}", max_tokens=3,
                                                     temperature=0, user=f"user-{u}")
                    assert comp.id.startswith("cmpl-") and isinstance(comp.choices[0].text, str)
                    assert comp.model == arms[router.arm("site", f"user:user-{u}", 0.5, True)].name  # sticky split
                    served[comp.model] = comp.id
                assert set(served) == {a, b}
                whole = client.completions.create(model="site", prompt="The permit", max_tokens=3, temperature=0,
                                                  user="user-0")
                pieces = [c.choices[0].text for c in client.completions.create(
                    model="site", prompt="The permit", max_tokens=3, temperature=0, stream=True, user="user-0")]
                assert "".join(pieces) == whole.choices[0].text and whole.usage.prompt_tokens > 0
                chat = client.chat.completions.create(model="site", messages=[{"role": "user", "content": "Who?"}],
                                                      max_tokens=2, temperature=0, user="user-1",
                                                      metadata={"reference": f"mail {EMAIL}"})
                with pytest.raises(BadRequestError, match="not a valid regex"):
                    client.completions.create(model="site", prompt="x", max_tokens=1,
                                              extra_body={"metadata": {"reference": "(", "expect": "regex"}})
                with pytest.raises(BadRequestError, match="prompt must be"):
                    client.completions.create(model="site", prompt="", max_tokens=1)
                assert http.post("/v1/feedback", json={"id": served[a], "rating": 4}).status_code == 200
        finally:
            written = rec.close()
            for x in arms.values():
                if x.llm is not None:
                    x.llm.close()
        assert (written["records"], written["feedback"]) == (9, 1)  # refused requests are not recorded
        rows = {r[0]: (json.loads(r[1]), r[2]) for r in v.con.execute(
            "SELECT id, messages, answer FROM serving_records").fetchall()}
    assert rows[served[a]][0] == [{"role": "prompt", "content": rows[served[a]][0][0]["content"]}]
    assert rows[chat.id][0] == [{"role": "user", "content": "Who?", "reference": "mail [EMAIL]",
                                 "expect": "contains"}]
    assert [x[1] for x in rows.values() if x[0][0]["content"] == "The permit"] == [whole.choices[0].text] * 2
    r = cli("--home", home, "--json", "feedback", "add", served[b], "--rating", "2")  # a completion's id too
    assert r.code == 0 and r.json["id"] == served[b]


def test_output_drift_replays_the_deployment_probes_over_time(served_home, cli, tmp_path):
    from appliance import api
    from appliance.db_time import utcnow

    src, a, b = served_home
    home = copy_home(src, tmp_path)
    assert cli("--home", home, "deploy", "create", "other", "--model", a, "--probes", "nope@1").code == 2
    r = cli("--home", home, "--json", "deploy", "create", "site", "--model", a, "--candidate", b, "--split", "0.5",
            "--probes", "handbook@1", "--probe-count", "4")
    assert r.code == 0 and r.json["probes"] == {"dataset": "handbook@1", "probes": 4, "replays": 0, "models": [],
                                                "last": None}
    assert [d["name"] for d in cli("--home", home, "--json", "deploy", "list").json["deployments"]] == ["site"]
    r = cli("--home", home, "--json", "eval", "drift", "--deployment", "site", "--window", "1d")
    assert r.code == 0 and r.json["replay"]["measured"] is False and "first replay" in r.json["replay"]["reason"]
    assert r.json["metrics"]["answer_change"] is None
    t0 = utcnow()
    with open_vault(home) as v:
        same = api.eval_drift_served(v, "site", "1d", now=t0 + timedelta(days=2))
    rp = same["replay"]
    assert same["ok"] and rp["measured"] and rp["baseline"]["model"] == a and rp["model"] == a
    assert rp["answer_change"] == 0.0 and rp["probe_kl"] < 1e-4  # the same GGUF answers the same
    assert rp["candidate"]["model"] == b
    assert [(h["model"], h["arm"], h["answer_change"]) for h in rp["history"]] == [
        (a, "model", 0.0), (b, "candidate", rp["candidate"]["answer_change"])]
    # another model version in service, and answers unlike those of a window ago: drift on the probes
    assert cli("--home", home, "deploy", "create", "site", "--model", b).code == 0
    with open_vault(home) as v:
        kept = json.loads(v.con.execute("SELECT snapshot FROM eval_drift WHERE name = 'deployment:site'").fetchone()[0])
        assert [(x["model"], x["arm"]) for x in kept] == [(a, "model"), (b, "candidate")] * 2
        for p in kept[2]["answers"]:  # the model's replay of day 2: the newest when the earlier window ended
            p["answer"] = "something else entirely"
        v.con.execute("UPDATE eval_drift SET snapshot = ? WHERE name = 'deployment:site'", [json.dumps(kept)])
        later = api.eval_drift_served(v, "site", "1d", now=t0 + timedelta(days=4))
    rp = later["replay"]
    assert (rp["baseline"]["model"], rp["model"], rp["baseline"]["at"]) == (a, b, same["replay"]["at"])
    assert later["ok"] is False and later["drifted"] == ["answer_change"] and rp["answer_change"] == 1.0
    assert rp["changed_probes"] == [0, 1, 2, 3] and "candidate" not in rp
    assert cli("--home", home, "--json", "deploy", "show", "site").json["probes"]["replays"] == 5
    assert cli("--home", home, "eval", "drift", "--model", a, "--baseline", "deployment:site").code == 2
