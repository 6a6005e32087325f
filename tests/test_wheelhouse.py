"""The offline install: a wheelhouse packed from this environment, carried as a signed installer bundle, installs
into a fresh virtual environment with pip reaching no index, and the installed appliance passes its checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("sh") is None, reason="install.sh needs a POSIX shell")

DEAD = "http://127.0.0.1:9"  # nothing listens here: a request to any index or proxy fails at once


def offline_env(tmp_path: Path) -> dict:
    """No pip configuration of this machine, and every way to a package index pointed at nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "APPLIANCE_"))}
    env.update(PIP_INDEX_URL=f"{DEAD}/simple", PIP_EXTRA_INDEX_URL=f"{DEAD}/simple", PIP_FIND_LINKS=f"{DEAD}/links",
               http_proxy=DEAD, https_proxy=DEAD, HTTP_PROXY=DEAD, HTTPS_PROXY=DEAD, HOME=str(tmp_path / "user"))
    return env


def _no_network() -> list[str]:
    """A command prefix that runs its command in a network namespace of its own, with no way out at all."""
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-rn"] if ok else []


def install(wheelhouse: Path, prefix: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*NO_NETWORK, "sh", str(wheelhouse / "install.sh"), "--prefix", str(prefix),
                           "--no-compile"], env=env, cwd=wheelhouse.parent, capture_output=True, text=True,
                          timeout=1200)


def torch_build() -> str:
    from importlib import metadata

    return "cpu" if metadata.version("torch").endswith("+cpu") else "cuda"


NO_NETWORK = _no_network()  # where unshare cannot, the dead proxies and index above are the fence


def tampered_copy(src: Path, dst: Path, wheel_name: str, release: str) -> Path:
    """`src` as a new release whose `wheel_name` wheel has one byte flipped (the other wheels linked, not copied)."""
    (dst / "wheels").mkdir(parents=True)
    for f in (src / "wheels").iterdir():
        if f.name.startswith(wheel_name + "-"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 1
            (dst / "wheels" / f.name).write_bytes(bytes(data))
        else:
            (dst / "wheels" / f.name).symlink_to(f)
    shutil.copy(src / "requirements.txt", dst)
    meta = json.loads((src / "wheelhouse.json").read_text())
    (dst / "install.sh").write_text((src / "install.sh").read_text().replace(meta["release"], release))
    return dst


def test_a_wheelhouse_from_this_environment_installs_offline(home, cli, tmp_path, monkeypatch):
    for k in [k for k in os.environ if k.startswith("PIP_")]:  # this machine's pip settings play no part
        monkeypatch.delenv(k)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    (tmp_path / "no-cache").mkdir()
    monkeypatch.setenv("APPLIANCE_WHEELS", str(tmp_path / "no-cache"))  # the download below sees one source
    monkeypatch.setenv("APPLIANCE_KEY_PASSPHRASE", "key passphrase 1")
    assert cli("--home", home, "keys", "generate", "--name", "site").code == 0
    pub = tmp_path / "site.pub"
    assert cli("--home", home, "keys", "export-public", "site", "--out", pub).code == 0

    wh, bundle = tmp_path / "wheelhouse", tmp_path / "appliance.bundle"
    r = cli("--home", home, "--json", "wheelhouse", "build", "--from-env", "--compress-level", "0", "--out", wh,
            "--sign-key", "site", "--bundle", bundle)
    assert r.code == 0, r.err
    meta = json.loads((wh / "wheelhouse.json").read_text())
    names = {w["name"] for w in meta["wheels"]}
    # the appliance, torch, DuckDB with its signed extension package, the llama.cpp wheel built at set-up
    assert {"appliance", "torch", "duckdb", "duckdb-ext-httpfs", "llama-cpp-python", "cryptography"} <= names
    assert not names & {"pytest", "ruff", "hypothesis"}  # what the tests need is not carried
    assert r.json["wheels"] == len(names) == len(list((wh / "wheels").iterdir()))
    assert r.json["torch"]["build"] == meta["torch"]["build"] == torch_build()
    req = (wh / "requirements.txt").read_text()
    from appliance.wheelhouse import WheelhouseError, _listing, check_whole

    listing = _listing(wh / "wheels")
    del listing["pathspec"]  # the check that stands before a wheelhouse takes its name sees a missing wheel
    with pytest.raises(WheelhouseError, match="lacks pathspec, needed by appliance"):
        check_whole(wh / "wheels", listing)
    assert req.count("--hash=sha256:") == len(names) and req.count("==") == len(names)

    # the download path (the default, on a connected machine), here from those wheels alone: pip picks the
    # same versions through the constraints, the torch build asked for, and so the very same files
    r = cli("--home", home, "--json", "wheelhouse", "build", "--no-index", "--find-links", wh / "wheels", "--out",
            tmp_path / "fetched")
    assert r.code == 0, r.err
    fetched = {w["name"]: w for w in json.loads((tmp_path / "fetched" / "wheelhouse.json").read_text())["wheels"]}
    assert r.json["source"] == "index" and fetched.keys() == names
    # the same files, but for the appliance's own wheel: built again, with this moment's file times inside
    changed = [w["name"] for w in meta["wheels"] if fetched[w["name"]]["sha256"] != w["sha256"]]
    assert changed == ["appliance"], changed
    shutil.rmtree(tmp_path / "fetched")
    other = "cuda" if torch_build() == "cpu" else "cpu"
    r = cli("--home", home, "wheelhouse", "build", "--no-index", "--find-links", wh / "wheels", "--torch", other,
            "--out", tmp_path / "other")
    assert r.code == 1 and "torch" in r.err and not (tmp_path / "other").exists()

    # the far side checks the signed bundle with `bundles` alone, then unpacks it
    far = tmp_path / "far"
    p = subprocess.run([sys.executable, "-m", "bundles", "unpack", str(bundle), "--trust", str(pub), "--to",
                        str(far), "--state", str(tmp_path / "versions.json")], capture_output=True, text=True)
    assert p.returncode == 0 and "ok: installer appliance" in p.stdout, p.stderr
    assert (far / "requirements.txt").read_text() == req
    shutil.rmtree(wh)  # from here on the far side has only what the bundle carried (and the disk holds one copy)
    bundle.unlink()

    env = offline_env(tmp_path)
    prefix = tmp_path / "opt"
    p = install(far, prefix, env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    current = prefix / "current"
    assert os.readlink(current) == f"releases/{meta['release']}"
    appliance = current / "bin" / "appliance"

    # the installed appliance runs from its own environment, and its checks pass: the packages, DuckDB's signed
    # extension (the vault's encryption) and llama.cpp
    d = subprocess.run([str(appliance), "--home", str(tmp_path / "far-home"), "--json", "doctor"], env=env,
                       capture_output=True, text=True, timeout=300)
    checks = {c["check"]: c for c in json.loads(d.stdout)["checks"]}
    assert checks["duckdb"]["status"] == "ok" and checks["llama.cpp"]["status"] == "ok", d.stdout
    assert checks["python"]["detail"].find(str(prefix)) > 0
    assert all(c["status"] == "ok" for n, c in checks.items() if n.startswith("package ")), d.stdout

    # a second run of the same release changes nothing
    again = install(far, prefix, env)
    assert again.returncode == 0 and "already installed" in again.stdout
    assert os.readlink(current) == f"releases/{meta['release']}"

    # an upgrade whose wheel was altered on the way fails on its hash: nothing is switched, nothing is left
    bad = tampered_copy(far, tmp_path / "bad", "click", "0.0.0-tampered")
    p = install(bad, prefix, env)
    assert p.returncode != 0 and "hash" in (p.stdout + p.stderr).lower()
    assert os.readlink(current) == f"releases/{meta['release']}"
    assert sorted(os.listdir(prefix / "releases")) == [meta["release"]]
    assert "nothing was switched" in p.stderr
    for big in (far, prefix):  # gigabytes: not kept among pytest's last temp directories
        shutil.rmtree(big)


def test_bad_requests_are_refused_before_any_work(home, cli, tmp_path):
    out = tmp_path / "wh"
    out.mkdir()
    (out / "keep").write_text("x")
    r = cli("--home", home, "wheelhouse", "build", "--from-env", "--out", out)
    assert r.code == 2 and "already exists" in r.err and (out / "keep").exists()
    r = cli("--home", home, "wheelhouse", "build", "--from-env", "--out", tmp_path / "w2", "--sign-key", "site")
    assert r.code == 2 and "--bundle and --sign-key go together" in r.err
    other = "cuda" if torch_build() == "cpu" else "cpu"
    r = cli("--home", home, "wheelhouse", "build", "--from-env", "--torch", other, "--out", tmp_path / "w3")
    assert r.code == 1 and f"cannot pack a {other} one" in r.err and not (tmp_path / "w3").exists()
    r = cli("--home", home, "wheelhouse", "build", "--from-env", "--out", tmp_path / "w4", "--sign-key", "nokey",
            "--bundle", tmp_path / "b")
    assert r.code == 2 and "no key named nokey" in r.err and not (tmp_path / "w4").exists()
    r = cli("--home", home, "wheelhouse", "build", "--from-env", "--out", out, "--force")  # not a wheelhouse
    assert r.code == 2 and "is not a wheelhouse" in r.err and (out / "keep").exists()
    r = cli("--home", home, "wheelhouse", "build", "--from-env", "--no-index", "--out", tmp_path / "w5")
    assert r.code == 2 and "--from-env packs what is installed" in r.err


def test_a_changed_installed_file_is_not_carried(tmp_path):
    """Packing checks each file against the hash pip recorded: a patched package is refused, not shipped."""
    import zipfile
    from importlib import metadata

    from appliance.wheelhouse import WheelhouseError, pack, pack_dist

    fname, _ = pack("pathspec", str(tmp_path))
    with zipfile.ZipFile(tmp_path / fname) as z:
        assert z.testzip() is None
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
        assert "pathspec/__init__.py,sha256=" in record and ".pyc" not in record

    installed = metadata.distribution("pathspec")
    site_packages = Path(installed.locate_file(""))
    copy = tmp_path / "lib" / "python3" / "site-packages"
    shutil.copytree(site_packages / "pathspec", copy / "pathspec")
    info = next(site_packages.glob("pathspec-*.dist-info"))
    shutil.copytree(info, copy / info.name)
    (copy / "pathspec" / "__init__.py").write_text("# changed\n")
    dist = next(d for d in metadata.distributions(path=[str(copy)]) if d.metadata["Name"] == "pathspec")
    (tmp_path / "out").mkdir()
    with pytest.raises(WheelhouseError, match="differs from what pip installed"):
        pack_dist(dist, str(tmp_path / "out"))
    assert not list((tmp_path / "out").iterdir())  # the half-written wheel is gone


def test_a_packed_wheel_is_what_pip_installed(tmp_path):
    """Executable files stay executable, package files keep their bytes (a `#!` is rewritten only in a wheel's
    own scripts), and RECORD names every entry with its hash and size."""
    import base64
    import hashlib
    import stat
    import zipfile
    from importlib import metadata

    from appliance.wheelhouse import pack

    for name in ("gguf", "tqdm"):
        fname, _ = pack(name, str(tmp_path))
        dist = metadata.distribution(name)
        with zipfile.ZipFile(tmp_path / fname) as z:
            infos = {i.filename: i for i in z.infolist()}
            [record_name] = [n for n in infos if n.endswith(".dist-info/RECORD")]
            rows = [ln.rsplit(",", 2) for ln in z.read(record_name).decode().splitlines()]
            assert {r[0] for r in rows} == set(infos)
            for path, digest, size in rows:
                if path == record_name:
                    continue
                data = z.read(path)
                assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
                    b"=").decode() and int(size) == len(data)
                installed = dist.locate_file(path)
                if Path(installed).is_file():
                    assert data == Path(installed).read_bytes(), path  # no rewriting of package files
                mode = infos[path].external_attr >> 16
                assert stat.S_ISREG(mode) and bool(mode & 0o111) == os.access(installed, os.X_OK), path
        assert not any(n.endswith(".pyc") for n in infos)
