"""Backup and restore: an encrypted, verifiable snapshot of a home, brought back whole or not at all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

MARKER = "OKAPI-LANTERN-5531-plaintext-marker"


@pytest.fixture
def kept(home, cli, tmp_path) -> Path:
    """A vault with a dataset holding MARKER, a model-like artifact and a run checkpoint."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "note.md").write_text(f"# note\n{MARKER} in a note\n" * 20)
    assert cli("--home", home, "vault", "ingest", src, "--dataset", "notes").code == 0
    from appliance import sealed
    from tests.conftest import open_vault

    with open_vault(home):  # artifacts are sealed at rest: written as the appliance writes them
        sealed.write_dir(home / "artifacts" / "models" / "m@1", {"model.safetensors": os.urandom(300_000)})
        sealed.write_dir(home / "artifacts" / "runs" / "m@1",
                         {"checkpoints/step-00000002/state.pt": os.urandom(1000)})
    return home


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_backup_restores_whole_and_holds_no_plaintext(kept, cli, tmp_path):
    out = tmp_path / "site.backup"
    r = cli("--home", kept, "--json", "vault", "backup", "--out", out)
    assert r.code == 0, r.err
    assert r.json["files"] >= 4 and r.json["checkpoints"] is True and out.stat().st_mode & 0o777 == 0o600
    data = out.read_bytes()
    assert MARKER.encode() not in data and b"safetensors" not in data  # names and contents are encrypted
    target = tmp_path / "restored"
    r = cli("--home", target, "--json", "vault", "restore", out)
    assert r.code == 0, r.err
    assert r.json["records"] == 1 and r.json["replaced"] is None and r.json["audit_entries"] >= 3
    assert tree(target / "artifacts") == tree(kept / "artifacts")
    assert cli("--home", target, "vault", "check").code == 0
    shown = cli("--home", target, "--json", "vault", "show", "notes@1").json
    assert shown["records"] == 1
    assert os.stat(target).st_mode & 0o777 == 0o700 and not list(tmp_path.glob(".restored.restore-*"))
    actions = [e["action"] for e in cli("--home", target, "--json", "audit", "log").json["entries"]]
    assert actions[-3:] == ["vault.backup", "vault.restore", "vault.check"]


def test_restore_never_replaces_a_home_unasked_and_keeps_the_old_one(kept, cli, tmp_path):
    out = tmp_path / "b.backup"
    cli("--home", kept, "vault", "backup", "--out", out, "--no-checkpoints")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    r = cli("--home", other, "vault", "restore", out)
    assert r.code == 2 and "is not empty" in r.err and (other / "keep.txt").read_text() == "precious"
    r = cli("--home", other, "--json", "vault", "restore", out, "--force")
    assert r.code == 0, r.err
    old = Path(r.json["replaced"])
    assert (old / "keep.txt").read_text() == "precious" and (other / "keyring.json").exists()
    assert not (other / "artifacts" / "runs" / "m@1" / "checkpoints").exists()  # --no-checkpoints
    from appliance import sealed

    assert sealed.exists(other / "artifacts" / "models" / "m@1" / "model.safetensors")
    from tests.conftest import open_vault

    with open_vault(other):  # another process holding the vault: the home is not replaced from under it
        import subprocess
        import sys

        code = (f"from appliance.cli import main; main(['--home', {str(other)!r}, 'vault', 'restore', "
                f"{str(out)!r}, '--force'])")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ})
    assert p.returncode == 2 and "in use by another appliance process" in p.stderr, p.stderr


def test_a_damaged_backup_or_a_wrong_passphrase_restores_nothing(kept, cli, tmp_path, monkeypatch):
    out = tmp_path / "b.backup"
    cli("--home", kept, "vault", "backup", "--out", out)
    assert cli("--home", kept, "vault", "backup", "--out", out).code == 2  # exists: --force to overwrite
    assert cli("--home", kept, "vault", "backup", "--out", kept / "x.backup").code == 2  # inside the home
    data = out.read_bytes()
    cases = {"flipped": data[:-5000] + bytes([data[-5000] ^ 1]) + data[-4999:], "cut": data[:-3000],
             "extended": data + b"\0" * 64, "not a backup": b"hello" * 100}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.backup"
        bad.write_bytes(blob)
        target = tmp_path / f"t-{name.replace(' ', '-')}"
        r = cli("--home", target, "vault", "restore", bad)
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1, (name, r.err)
        assert not target.exists() and not list(tmp_path.glob(".t-*")), name  # nothing half-written
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", "not the passphrase at all")
    r = cli("--home", tmp_path / "t-wrong", "vault", "restore", out)
    assert r.code == 1 and "wrong passphrase" in r.err and not (tmp_path / "t-wrong").exists()
