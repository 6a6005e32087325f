"""A sealed artifact's manifest deleted: the vault records which artifacts are written with manifests, so one
without its manifest is refused, not opened as an artifact made before manifests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from appliance import sealed
from tests.conftest import artifact_bytes, open_vault

M = sealed.MANIFEST + sealed.SUFFIX


def _refused(path: Path) -> str:
    """The one line an open of `path` (a sealed directory) fails with."""
    with pytest.raises(sealed.SealedError) as e, sealed.opened(path):
        pass
    assert "\n" not in str(e.value)
    return str(e.value)


def _manifested(home: Path, artifact: str):
    with open_vault(home, read_only=True) as v:
        row = v.con.execute("SELECT manifested FROM artifact_keys WHERE artifact = ?", [artifact]).fetchone()
    return row[0] if row else "no key"


def test_a_new_models_manifest_deleted_then_a_file_removed_or_swapped_does_not_open(home, cli):
    a = home / "artifacts" / "models" / "new@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b'{"a": 1}', "w.bin": b"weights of the first write"})
        first = (a / "w.bin.sealed").read_bytes()
        v.store.write_dir(a, {"config.json": b'{"a": 1}', "w.bin": b"weights of the second write"})
    assert _manifested(home, "models/new@1") is True

    (a / M).unlink()  # the attack: the artifact would pass as one made before manifests
    (a / "w.bin.sealed").write_bytes(first)  # then the earlier weights put back
    with open_vault(home, read_only=True):
        msg = _refused(a)
        assert msg.startswith("the manifest of the artifact models/new@1 is missing: the vault records it was "
                              "written with one") and "restore the artifact from a backup, or make it again" in msg
        with pytest.raises(sealed.SealedError, match="manifest of the artifact models/new@1 is missing"):
            sealed.read_bytes(a / "w.bin")
    (a / "config.json.sealed").unlink()  # and a file removed
    with open_vault(home, read_only=True):
        assert "manifest of the artifact models/new@1 is missing" in _refused(a)
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code != 0 and r.json["unmanifested"] == []
    assert any(p.startswith("artifact models/new@1: the manifest of the artifact models/new@1 is missing")
               for p in r.json["problems"])
    r = cli("--home", home, "--json", "vault", "seal")  # never given a fresh manifest over what the attacker left
    assert r.code == 0 and r.json["sealed"] == [] and not (a / M).exists()


def test_a_runs_checkpoint_manifest_deleted_then_a_file_removed_or_swapped_does_not_load(home):
    import torch

    from appliance.train import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    run = home / "artifacts" / "runs" / "r@1"
    with open_vault(home) as v:
        v.store.keys.key("runs/r@1", create=True)  # as the launcher makes a run's key before its ranks write
        step = checkpoint.save(run / "checkpoints", 2, model, opt, {"run": "r@1", "loss": 9.0}, True, 3)
        earlier = (step / "state.json.sealed").read_bytes()
        step = checkpoint.save(run / "checkpoints", 2, model, opt, {"run": "r@1", "loss": 1.0}, True, 3)
        assert not (run / M).exists() and (step / M).is_file()  # a run of checkpoints only: each has its own

        (step / M).unlink()  # the attack
        (step / "state.json.sealed").write_bytes(earlier)  # the step's earlier loss put back
        with pytest.raises(sealed.SealedError, match=r"the manifest of the artifact runs/r@1 is missing \(in "
                                                     r"checkpoints/step-00000002\)"):
            checkpoint.read_state(step)
        (step / "rng.pt.sealed").unlink()  # and a file removed
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        with pytest.raises(sealed.SealedError, match="manifest of the artifact runs/r@1 is missing"):
            checkpoint.load(step, fresh, torch.optim.AdamW(fresh.parameters()))
        with pytest.raises(sealed.SealedError, match="manifest of the artifact runs/r@1 is missing"):
            v.store.check(run)
        with pytest.raises(sealed.SealedError, match="manifest of the artifact runs/r@1 is missing"):
            v.store.write_file(run / "report.json", b"{}")  # nothing more is written into it either


def test_a_ranks_keys_carry_which_artifacts_have_manifests(tmp_path):
    art = tmp_path / "home" / "artifacts"
    art.mkdir(parents=True)
    (art.parent / "keyring.json").write_text("{}")
    keys = {"runs/r@1": os.urandom(32), "models/old@1": os.urandom(32)}
    writer = sealed.Store(art, tmp_path / "home" / "tmp", sealed.GivenKeys(dict(keys)))
    writer.write_dir(art / "runs/r@1", {"recipe.json": b"{}", "checkpoints/step-1/state.json": b"{}"})
    writer.write_dir(art / "models/old@1", {"w.bin": b"older"})
    for d in ("runs/r@1", "runs/r@1/checkpoints/step-1", "models/old@1"):
        (art / d / M).unlink()
    rank = sealed.Store(art, tmp_path / "home" / "tmp", sealed.GivenKeys(dict(keys), {"runs/r@1"}))  # as handed
    with pytest.raises(sealed.SealedError, match="manifest of the artifact runs/r@1 is missing"):
        rank.check(art / "runs/r@1/checkpoints/step-1")
    with pytest.raises(sealed.SealedError, match="manifest of the artifact runs/r@1 is missing"):
        rank.read_bytes(art / "runs/r@1/recipe.json")
    assert rank.check(art / "models/old@1") is False  # made before manifests: opens as before
    assert rank.read_bytes(art / "models/old@1/w.bin") == b"older"


def test_an_artifact_made_before_manifests_opens_and_is_listed_and_vault_seal_leaves_it_so(home, cli):
    a = home / "artifacts" / "models" / "old@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b"{}", "w.bin": b"older weights"})
        # as an older appliance left it: its key recorded before schema 2, no manifest
        v.con.execute("UPDATE artifact_keys SET manifested = NULL WHERE artifact = 'models/old@1'")
    (a / M).unlink()
    assert artifact_bytes(home, a / "w.bin") == b"older weights"
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code == 0 and r.json["unmanifested"] == ["models/old@1"] and r.json["artifacts"] == 1
    r = cli("--home", home, "--json", "vault", "seal")  # a manifest written now would bless what lies there now
    assert r.code == 0 and r.json["sealed"] == [] and not (a / M).exists()
    assert _manifested(home, "models/old@1") is None
    assert artifact_bytes(home, a / "config.json") == b"{}"


def test_vault_seal_gives_an_older_artifact_it_rewrites_manifests_and_records_it(home, cli):
    a = home / "artifacts" / "tokenizers" / "old@1"
    with open_vault(home) as v:  # sealed before manifests, its key recorded before schema 2
        v.store.write_dir(a, {"vocab.json": b"{}"})
        v.con.execute("UPDATE artifact_keys SET manifested = NULL WHERE artifact = 'tokenizers/old@1'")
    (a / M).unlink()
    (a / "tokenizer.json").write_text('{"vocab": "in the clear"}')  # and a file an appliance before sealing left
    r = cli("--home", home, "--json", "vault", "seal")
    assert r.code == 0 and r.json["sealed"] == ["tokenizers/old@1"]
    assert (a / M).is_file() and _manifested(home, "tokenizers/old@1") is True
    assert artifact_bytes(home, a / "tokenizer.json") == b'{"vocab": "in the clear"}'
    (a / M).unlink()
    with open_vault(home, read_only=True):
        assert "manifest of the artifact tokenizers/old@1 is missing" in _refused(a)


def test_vault_check_records_a_whole_artifact_whose_key_predates_the_column(home, cli):
    a = home / "artifacts" / "models" / "mid@1"
    with open_vault(home) as v:  # written with manifests by an appliance before schema 2
        v.store.write_dir(a, {"w.bin": b"w"})
        v.con.execute("UPDATE artifact_keys SET manifested = NULL WHERE artifact = 'models/mid@1'")
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code == 0 and r.json["unmanifested"] == []
    assert _manifested(home, "models/mid@1") is True
    (a / M).unlink()
    with open_vault(home, read_only=True):
        assert "manifest of the artifact models/mid@1 is missing" in _refused(a)


def test_backup_restore_and_rekey_keep_which_artifacts_have_manifests(home, cli, tmp_path):
    a = home / "artifacts" / "models" / "new@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"w.bin": b"w"})
    assert cli("--home", home, "vault", "rekey").code == 0
    assert _manifested(home, "models/new@1") is True
    out = tmp_path / "home.backup"
    r = cli("--home", home, "vault", "backup", "--out", out)
    assert r.code == 0, r.err
    back = tmp_path / "back"
    r = cli("--home", back, "vault", "restore", out)
    assert r.code == 0, r.err
    assert _manifested(back, "models/new@1") is True
    (back / "artifacts" / "models" / "new@1" / M).unlink()
    with open_vault(back, read_only=True):
        assert "manifest of the artifact models/new@1 is missing" in _refused(back / "artifacts/models/new@1")


# --- the schema: a vault from before the column gets it, its keys stay as made before manifests --------------
def test_the_migration_adds_the_column_and_keeps_older_keys_unmanifested(tmp_path, monkeypatch):
    from appliance.vault import schema
    from tests.test_migrate import fixture_home, open_, schema_of

    h = fixture_home(1, tmp_path)
    older_ddl = [s.replace(", manifested BOOLEAN", "") for s in schema.DDL]
    with monkeypatch.context() as m:  # the appliance at schema 1 writes an artifact key
        m.setattr("appliance.vault.schema.SCHEMA_VERSION", 1)
        m.setattr("appliance.vault.vault.SCHEMA_VERSION", 1)
        m.setattr("appliance.vault.vault.DDL", older_ddl)
        with open_(h) as v:
            v.con.execute("INSERT INTO artifact_keys VALUES ('models/old@1', ?, now())", [os.urandom(32)])
    assert schema_of(h) == 2  # a read-only open migrates first
    with open_(h) as v:
        assert v.con.execute("SELECT artifact, manifested FROM artifact_keys").fetchall() == [("models/old@1", None)]
        assert v.store.keys.manifested("models/old@1") is False
        v.store.keys.key("models/new@1", create=True)
        assert v.store.keys.manifested("models/new@1") is True
        assert v.check().ok
        last = v.con.execute("SELECT action FROM audit ORDER BY seq DESC LIMIT 1").fetchone()[0]
        assert last == "vault.migrate"
    assert len(list((h / "backups").glob("before-schema-2-*.backup"))) == 1


def test_a_fixture_vault_without_the_table_migrates_too(tmp_path):
    from tests.test_migrate import fixture_home, open_, schema_of

    h = fixture_home(1, tmp_path)
    shutil.rmtree(h / "backups", ignore_errors=True)
    with open_(h) as v:
        cols = [c for (c,) in v.con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                            "table_name = 'artifact_keys'").fetchall()]
    assert "manifested" in cols and schema_of(h) == 2


def test_the_launcher_hands_the_ranks_write_keys_and_what_they_read_frozen_in_memory_not_its_key(home):
    """A rank gets the keys of what its run writes (and which of those have manifests), and its base and tokenizer
    as read-only in-memory files passed over the socket. With the base's key a rank could seal a base of its own
    making that the next run would load; it has no such key, and the files it holds refuse writes."""
    import socket
    import tempfile
    from types import SimpleNamespace

    from appliance.train import launch, run

    art = home / "artifacts"
    base = art / "models" / "base@1"
    with open_vault(home) as v:
        v.store.write_dir(base, {"config.json": b'{"a": 1}', "w.bin": b"the base's weights"})
        spec = SimpleNamespace(tokenizer_path=base, base_path=base, run_dir=art / "runs" / "r@1",
                               model_dir=art / "models" / "r@1")
        given = run.run_keys(v, spec)
        files = run.run_files(v, spec)
    assert sorted(given.keys) == ["models/r@1", "runs/r@1"] and given.with_manifests == {"models/r@1", "runs/r@1"}
    assert {a: sorted(f) for a, f in files.items()} == {"models/base@1": ["config.json", "w.bin"]}
    path = Path(tempfile.mkdtemp(prefix="appliance-test-")) / "t.sock"  # AF_UNIX paths are short
    server = launch.serve(path, "ticket", SimpleNamespace(to_dict=dict), None, None, None, {}, keys=given,
                          files=files)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            launch.send(s, {"op": "hello", "ticket": "ticket"})
            header, _ = launch.recv(s)
            handed = launch.receive_files(s, header["files"])
        assert header["ok"] and sorted(header["keys"]) == ["models/r@1", "runs/r@1"]
        assert header["manifested"] == ["models/r@1", "runs/r@1"]
        server.stop_handing()  # the run is over and its files about to close: nothing more is sent
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            launch.send(s, {"op": "hello", "ticket": "ticket"})
            late, _ = launch.recv(s)
            with pytest.raises(ConnectionError):
                launch.receive_files(s, late["files"])
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(path.parent, ignore_errors=True)
        run._close_files(files)

    # the rank's side: it reads the base from what it was handed, and cannot write it
    assert not any(os.get_inheritable(f.fd) for fs in handed.values() for f in fs.values())  # no program it runs
    rank = sealed.Store(art, home / "tmp", sealed.GivenKeys({}), handed)
    with rank.opened(base) as d:
        assert (d / "w.bin").read_bytes() == b"the base's weights" and (d / "config.json").read_bytes() == b'{"a": 1}'
    assert rank.read_bytes(base / "config.json") == b'{"a": 1}' and rank.check(base)
    with pytest.raises(sealed.SealedError, match="given no key for the artifact models/base@1"):
        rank.write_dir(base, {"w.bin": b"weights of the rank's making"})
    with rank.opened(base) as d, pytest.raises(PermissionError):
        (d / "w.bin").write_bytes(b"weights of the rank's making")  # frozen: no process may write it
    (base / "chat_template.jinja").write_text("planted in the clear")  # not handed over: never read from disk
    with pytest.raises(sealed.SealedError), rank.opened(base / "chat_template.jinja"):
        pass
    with open_vault(home, read_only=True):
        assert sealed.read_bytes(base / "w.bin") == b"the base's weights"
    run._close_files(handed)


def test_files_planted_in_the_clear_in_a_sealed_artifact_are_never_sealed_into_it(home, cli):
    """A checkpoint planted in the clear (PyTorch unpickles its metadata) must not become part of a sealed run
    through `vault seal`: that would run it on resume."""
    a = home / "artifacts" / "models" / "m@1"
    run = home / "artifacts" / "runs" / "r@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b'{"a": 1}'})
        v.store.write_dir(run, {"recipe.json": b"{}"})
    (a / "chat_template.jinja").write_text("{{ 'planted' }}")
    (run / "checkpoints" / "step-99999999").mkdir(parents=True)
    (run / "checkpoints" / "step-99999999" / ".metadata").write_bytes(b"a pickle")
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code != 0 and r.json["unsealed"] == []
    said = [p for p in r.json["problems"] if "in the clear that the appliance did not write" in p]
    assert len(said) == 2 and said[0].startswith("artifact models/m@1:"), r.json["problems"]
    r = cli("--home", home, "vault", "seal")
    assert r.code != 0 and "were put there by hand, and are never sealed into it" in r.err
    assert not (a / "chat_template.jinja.sealed").exists() and not list(run.rglob(".metadata.sealed"))
    with open_vault(home, read_only=True), sealed.opened(a) as p:
        assert sorted(os.listdir(p)) == ["config.json"]


def test_an_export_of_an_artifact_with_a_file_removed_is_refused(home, tmp_path):
    """A plain export or a bundle reads the artifact file by file: the set is checked first, so a removed file
    is said, not silently left out of what leaves the box."""
    from appliance import exchange
    from appliance.vault import lineage

    a = home / "artifacts" / "models" / "m@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b"{}", "chat_template.jinja": b"t", "w.safetensors": b"w"})
        with v.transaction() as con:
            lineage.add_node(con, "m@1", "model")
    (a / "chat_template.jinja.sealed").unlink()
    with open_vault(home) as v:
        with pytest.raises(sealed.SealedError, match="models/m@1 does not match its manifest: chat_template.jinja "
                                                     "is missing"):
            exchange.export_plain(v, "m@1", tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_file_new_to_an_artifact_whose_write_died_before_its_rename_leaves_the_artifact_opening(home, monkeypatch):
    run = home / "artifacts" / "runs" / "r@1"
    with open_vault(home) as v:
        v.store.write_file(run / "recipe.json", b"{}")

        real = sealed.seal_manifest
        calls = []

        def dies_after_the_first(*a, **k):
            calls.append(1)
            real(*a, **k)
            if len(calls) == 1:
                raise KeyboardInterrupt  # the process dies between the pending manifest and the file's rename

        monkeypatch.setattr(sealed, "seal_manifest", dies_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            v.store.write_file(run / "report.json", b"[]")
        monkeypatch.setattr(sealed, "seal_manifest", real)
        assert v.store.check(run)  # opens as it was
        v.store.write_file(run / "report.json", b"[1]")
        assert v.store.check(run) and sealed.read_bytes(run / "report.json") == b"[1]"


def test_a_link_in_place_of_a_sealed_file_is_a_problem_of_its_artifact_not_a_crash(home, cli):
    a = home / "artifacts" / "models" / "m@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b"{}", "w.bin": b"w"})
    (a / "w.bin.sealed").unlink()
    (a / "w.bin.sealed").symlink_to(a / "config.json.sealed")
    r = cli("--home", home, "--json", "vault", "check")
    assert r.code != 0 and any(p.startswith("artifact models/m@1: the artifact models/m@1 does not match its "
                                            "manifest: w.bin") for p in r.json["problems"]), r.json["problems"]


def _two_writes(home: Path) -> tuple[Path, bytes]:
    """A model written twice; the earlier copy of its weights, as an attacker kept it."""
    a = home / "artifacts" / "models" / "m@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b"{}", "w.bin": b"weights of the first write"})
        first = (a / "w.bin.sealed").read_bytes()
        v.store.write_dir(a, {"config.json": b"{}", "w.bin": b"weights of the second write"})
    return a, first


def test_a_file_put_back_after_its_directory_was_checked_is_not_the_one_opened(home, monkeypatch):
    """The race: the directory checked against its manifest, then an earlier copy of a file put back before
    the file is opened. The comparison is made on the descriptor that is read, so it is refused."""
    a, first = _two_writes(home)
    real = sealed.Store.check

    def checked_then_swapped(self, path):
        ok = real(self, path)
        (a / "w.bin.sealed").unlink()
        (a / "w.bin.sealed").write_bytes(first)
        return ok

    monkeypatch.setattr(sealed.Store, "check", checked_then_swapped)
    with open_vault(home, read_only=True):
        assert "w.bin is not the copy last written" in _refused(a)


def test_a_file_put_back_only_while_it_is_read_is_not_the_one_opened(home, monkeypatch):
    """The race the other way: an earlier copy in place while the file is read, the last one back before any
    check by name could look."""
    a, first = _two_writes(home)
    last = (a / "w.bin.sealed").read_bytes()
    real, swapped = os.open, []

    def swaps_around_the_read(path, flags, *rest):
        if str(path).endswith("w.bin.sealed") and not swapped:  # the open that reads it; not a check after
            swapped.append(path)
            Path(path).unlink()
            Path(path).write_bytes(first)
            fd = real(path, flags, *rest)
            Path(path).unlink()
            Path(path).write_bytes(last)  # a new file: the descriptor above still reads the earlier copy
            return fd
        return real(path, flags, *rest)

    with open_vault(home, read_only=True):
        monkeypatch.setattr(sealed.os, "open", swaps_around_the_read)
        with pytest.raises(sealed.SealedError, match="w.bin is not the copy last written"):
            sealed.read_bytes(a / "w.bin")


def test_a_fifo_in_place_of_a_sealed_file_is_refused_not_waited_on(home):
    import threading

    a = home / "artifacts" / "models" / "m@1"
    with open_vault(home) as v:
        v.store.write_dir(a, {"config.json": b"{}"})
    (a / "config.json.sealed").unlink()
    os.mkfifo(a / "config.json.sealed")
    said = []

    def read():
        try:
            sealed.read_bytes(a / "config.json")
        except sealed.SealedError as e:
            said.append(str(e))

    with open_vault(home, read_only=True):
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(20)
        if t.is_alive():  # the read waits for a writer: give it one, then fail
            with open(a / "config.json.sealed", "wb"):
                pass
            t.join(5)
            pytest.fail("a read of a FIFO in a sealed file's place blocked")
    assert said and "is not a sealed artifact file" in said[0]
