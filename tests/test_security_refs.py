"""Attacks on the one resolver and on an agent's calls, found by review of the one-door change; each test
performs the attack and fails without its fix.

- A trusted (or stolen) sending site names its bundle's lineage id after this site's own model (`pilot`) or
  GGUF (`pilot:q4_k_m`): after import, a bare name must still mean this site's newest pilot@K, and `chat` /
  `generate` must not find the sender's file under a name the sender chose (not even one not made here yet).
- An agent call must not change who the operator is on a vault handle other threads are using.
- A refusal's hint lists what the vault holds; an agent without `read` must not learn names from a mistake.
"""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import PASSPHRASE, artifact_bytes

KEY_PASS = "key pass 1234"


@pytest.fixture()
def site(tmp_path, monkeypatch):
    """A home with its own pilot@1 and pilot@1:q4_k_m, and a partner key trusted for models and GGUFs."""
    from appliance import api, sealed
    from appliance.vault import lineage

    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", KEY_PASS)
    h = tmp_path / "home"
    api.init(h, PASSPHRASE)
    with api.open(h, PASSPHRASE) as v:
        with v.transaction():
            lineage.add_node(v.con, "pilot@1", "model", [])
            lineage.add_node(v.con, "pilot@1:q4_k_m", "gguf", [("pilot@1", "source")])
        sealed.write_dir(v.home.artifacts / "models" / "pilot@1", {"config.json": b"{}"})
        sealed.write_dir(v.home.artifacts / "gguf" / "pilot@1-q4_k_m", {"pilot@1-q4_k_m.gguf": b"GGUF local"})
        api.keys_generate(v, "partner")
        pub = tmp_path / "partner.pub"
        api.keys_export_public(v, "partner", out=pub)
        api.trust_add(v, pub, "partner", ["model", "gguf"])
    return h


def _bundles(h, tmp_path, model_id: str, gguf_id: str, version: int):
    from appliance.exchange import secret_key
    from appliance.home import Home
    from bundles import container

    signer = secret_key(Home(h), "partner")
    evil = tmp_path / "evil"
    evil.mkdir(exist_ok=True)
    (evil / "config.json").write_text('{"evil": true}')
    (evil / "x.gguf").write_bytes(b"GGUF attacker")
    m, g = tmp_path / f"m-{len(model_id)}.bundle", tmp_path / f"g-{len(gguf_id)}.bundle"
    container.create(m, "model", "evil", version, [("config.json", evil / "config.json")], signer,
                     {"id": model_id})
    container.create(g, "gguf", "evil.q4_k_m", version, [("x.gguf", evil / "x.gguf"),
                     ("appliance.json", json.dumps({"id": gguf_id}).encode())], signer, {"id": gguf_id})
    return m, g


def test_an_imported_bundle_never_takes_this_sites_names(site, tmp_path):
    from appliance import api, refs
    from appliance.agent_refs import agent_overrides
    from appliance.errors import ApplianceError

    for version, (model_id, gguf_id) in enumerate((("pilot", "pilot:q4_k_m"), ("pilot@2", "pilot@2:q4_k_m")), 1):
        m, g = _bundles(site, tmp_path, model_id, gguf_id, version)
        with api.open(site, PASSPHRASE) as v:
            api.bundle_import(v, m)
            api.bundle_import(v, g)
            assert refs.model(v.con, "pilot") == "pilot@1"
            assert refs.gguf(v.con, "pilot:q4_k_m") == "pilot@1:q4_k_m"
            assert agent_overrides(v.con, ["model.base=pilot"]) == ['model.base="pilot@1"']
            with pytest.raises(ApplianceError):  # pilot@2 is this site's next name, not the sender's
                refs.model(v.con, "pilot@2")
        for ref in ("pilot:q4_k_m", "pilot@2:q4_k_m"):  # vault-less: chat, generate, serve
            with pytest.raises(ApplianceError, match="no GGUF"):
                api.gguf_locate(ref, site)
        assert artifact_bytes(site, api.gguf_locate("pilot@1:q4_k_m", site)) == b"GGUF local"


def test_a_senders_whole_id_still_works_where_this_site_has_no_such_name(tmp_path, monkeypatch):
    # the legitimate use: hq's sft@1:q4_k_m at an edge site that never made an `sft` of its own
    from appliance import api
    from appliance.home import Home

    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", KEY_PASS)
    hq, edge = tmp_path / "hq", tmp_path / "edge"
    for h in (hq, edge):
        api.init(h, PASSPHRASE)
    with api.open(hq, PASSPHRASE) as v:
        api.keys_generate(v, "hq")
        api.keys_export_public(v, "hq", out=tmp_path / "hq.pub")
    with api.open(edge, PASSPHRASE) as v:
        api.trust_add(v, tmp_path / "hq.pub", "hq", ["gguf"])
    from appliance.exchange import secret_key
    from bundles import container

    (tmp_path / "m.gguf").write_bytes(b"GGUF from hq")
    b = tmp_path / "g.bundle"
    container.create(b, "gguf", "sft.q4_k_m", 1, [("m.gguf", tmp_path / "m.gguf")], secret_key(Home(hq), "hq"),
                     {"id": "sft@1:q4_k_m"})
    with api.open(edge, PASSPHRASE) as v:
        assert api.bundle_import(v, b)["id"] == "sft.q4_k_m@1"
        assert api.lineage(v, "sft@1:q4_k_m")["lineage"]["id"] == "sft.q4_k_m@1"
    assert artifact_bytes(edge, api.gguf_locate("sft@1:q4_k_m", edge)) == b"GGUF from hq"
    # the index is the importer's, beside the imports: a bundle's own files cannot write it
    index = Home(edge).artifacts / "gguf" / ".senders.json"
    assert json.loads(index.read_text()) == {"sft@1:q4_k_m": "sft.q4_k_m@1"}
    assert index.stat().st_mode & 0o077 == 0


def test_an_agent_call_does_not_change_who_the_operator_is_on_a_shared_handle(tmp_path, monkeypatch):
    from appliance import api
    from appliance.api import data

    monkeypatch.setenv("APPLIANCE_ACTOR", "ops-alice")
    h = tmp_path / "home"
    api.init(h, PASSPHRASE)
    real = data.vault_datasets
    inside, go = threading.Event(), threading.Event()

    def slow(v):
        inside.set()
        go.wait(10)
        return real(v)

    monkeypatch.setattr(data, "vault_datasets", slow)
    with api.open(h, PASSPHRASE) as v:
        token = api.grant_create(v, "eve", ["read", "train"])["token"]
        t = threading.Thread(target=api.agent_vault_datasets, args=(v, token))
        t.start()
        assert inside.wait(10)
        with v.transaction():  # the operator, on the same handle, while the agent's call is in progress
            v.audit("operator.action", [], {})
        go.set()
        t.join()
        assert v.actor is None
        rows = v.con.execute("SELECT action, actor FROM audit WHERE action IN ('operator.action', "
                             "'mcp.vault_datasets') ORDER BY seq").fetchall()
    assert rows == [("mcp.vault_datasets", "agent:eve"), ("operator.action", "ops-alice")]


def test_an_agent_without_read_learns_no_names_from_a_refusal(tmp_path):
    from appliance import api
    from appliance.errors import ApplianceError
    from appliance.vault import lineage

    h = tmp_path / "home"
    api.init(h, PASSPHRASE)
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("quarterly intake notes for the merger review.\n" * 5)
    with api.open(h, PASSPHRASE) as v:
        api.vault_ingest(v, [src], "secret-merger")
        with v.transaction():
            lineage.add_node(v.con, "target-model@3", "model", [])
        said = []
        for caps, call in ((["train"], lambda t: api.agent_jobs_submit(v, t, "tiny-dense", ["data.datasets=x"])),
                           (["eval"], lambda t: api.agent_jobs_eval(v, t, "x@1", "target-model@3")),
                           (["train"], lambda t: api.agent_jobs_submit(v, t, "sft-lora", ["model.base=x"]))):
            token = api.grant_create(v, "noread", caps)["token"]
            with pytest.raises(ApplianceError) as e:
                call(token)
            said.append(str(e.value))
        # with read, the same mistake names what there is (the operator's own help)
        token = api.grant_create(v, "reader", ["read", "train"])["token"]
        with pytest.raises(ApplianceError) as e:
            api.agent_jobs_submit(v, token, "tiny-dense", ["data.datasets=x"])
    assert not any("secret-merger" in s or "target-model" in s for s in said), said
    assert all("ask the operator" in s for s in said)
    assert "secret-merger" in str(e.value)
