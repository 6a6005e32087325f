"""Keys, trust and bundles on the appliance side: what leaves the box and what comes in, recorded.

The format lives in the light `bundles` package; this module picks what goes into a bundle (a model
directory, a GGUF directory), numbers versions per bundle name, lands imports atomically in the home's
artifacts, and writes lineage and audit entries. Secret keys live in HOME/keys sealed under their own
passphrase (APPLIANCE_KEY_PASSPHRASE[_FILE]); trusted signers in HOME/trust.

Agents name things, never paths: an agent's export (`outbox_export`) lands under a plain file name in
HOME/outbox, created exclusively and never through a link, signed by one of the home's keys by name and
encrypted to sites in the trust store, by name: always, a bundle an agent asks for in the clear is refused.
No agent tool writes anywhere else in the home.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance import sealed
from appliance.db_time import iso, utcnow
from appliance.errors import BundleRefused, UsageError, bundle_errors
from appliance.home import Home, atomic_write
from bundles import container
from bundles.keys import PublicKey, SecretKey, key_passphrase
from bundles.trust import TrustStore
from bundles.trust import add as trust_add_entry
from bundles.trust import remove as trust_remove_entry


def keys_dir(home: Home) -> Path:
    return home.root / "keys"


def trust_dir(home: Home) -> Path:
    return home.root / "trust"


# --- keys ------------------------------------------------------------------------------------------
@bundle_errors()
def generate_key(vault, name: str) -> PublicKey:
    from appliance.vault.ingest import validate_name

    validate_name(name, "key")
    d = keys_dir(vault.home)
    if (d / f"{name}.key").exists():
        raise UsageError(f"a key named {name} already exists", "pick another --name")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = SecretKey.generate(name)
    atomic_write(d / f"{name}.key", json.dumps(key.seal(key_passphrase()), indent=2).encode())
    atomic_write(d / f"{name}.pub", json.dumps(key.public.to_json(), indent=2).encode(), mode=0o644)
    with vault.transaction():
        vault.audit("keys.generate", [name], {"key_id": key.public.key_id})
    return key.public


@bundle_errors()
def list_keys(home: Home) -> list[dict]:
    d = keys_dir(home)
    return [{"name": p.stem, "key_id": PublicKey.load(p).key_id, "public": str(p)}
            for p in sorted(d.glob("*.pub"))] if d.is_dir() else []


@bundle_errors()
def public_key(home: Home, name: str) -> tuple[Path, PublicKey]:
    p = keys_dir(home) / f"{name}.pub"
    if not p.is_file():
        raise UsageError(f"no key named {name}", "see `appliance keys list`")
    return p, PublicKey.load(p)


@bundle_errors()
def export_public(home: Home, name: str, out: str | Path | None = None) -> dict:
    """The public key file other sites trust or encrypt to (`keys export-public`); written to `out` when given."""
    _, pub = public_key(home, name)
    if out:
        atomic_write(Path(out), json.dumps(pub.to_json(), indent=2).encode(), mode=0o644)
    return {"name": name, "key_id": pub.key_id, "out": str(out) if out else None, "public": pub.to_json()}


@bundle_errors()
def secret_key(home: Home, name: str) -> SecretKey:
    p = keys_dir(home) / f"{name}.key"
    if not p.is_file():
        raise UsageError(f"no key named {name}", "see `appliance keys list`")
    return SecretKey.load(p)


def _identities(home: Home) -> list[SecretKey]:
    d = keys_dir(home)
    files = sorted(d.glob("*.key")) if d.is_dir() else []
    return [SecretKey.load(p) for p in files]


# --- trust -----------------------------------------------------------------------------------------
@bundle_errors()
def trust_add(vault, pub_file: Path, name: str, kinds: list[str]) -> dict:
    entry = trust_add_entry(trust_dir(vault.home), PublicKey.load(pub_file), name, kinds)
    with vault.transaction():
        vault.audit("trust.add", [name], {"key_id": entry.key.key_id, "kinds": list(entry.kinds)})
    return entry.to_json()


@bundle_errors()
def trust_remove(vault, name: str) -> dict:
    entry = trust_remove_entry(trust_dir(vault.home), name)
    with vault.transaction():
        vault.audit("trust.remove", [name], {"key_id": entry.key.key_id})
    return entry.to_json()


def _trust(home: Home) -> TrustStore:
    d = trust_dir(home)
    return TrustStore.load(d) if d.is_dir() else TrustStore([])


@bundle_errors()
def trusted_key(home: Home, name: str) -> PublicKey:
    """The public key of a trusted site, by its name in the trust store (a recipient to encrypt to)."""
    match = [t.key for t in _trust(home).entries if t.name == name]
    if not match:
        raise UsageError(f"no trusted site named {name}", "see `appliance trust list`")
    return match[0]


@bundle_errors()
def trust_list(home: Home) -> list[dict]:
    d = trust_dir(home)
    return [{"name": t.name, "key_id": t.key.key_id, "kinds": list(t.kinds)}
            for t in TrustStore.load(d).entries] if d.is_dir() else []


# --- export ----------------------------------------------------------------------------------------
def _what(vault, ref: str) -> tuple[str, str, str, Path | None]:
    """(lineage id, kind, bundle name, directory of files) for a model, GGUF or dataset version."""
    from appliance import refs
    from appliance.quantize.stage import gguf_dir
    from appliance.vault import lineage

    # NAME@K, NAME (the newest), an imported artifact's id at the sender: `appliance.refs`
    node_id = refs.node(vault.con, ref, BUNDLED, "model, GGUF, dataset version or eval run")
    kind = lineage.kind_of(vault.con, node_id)
    if kind in ("dataset", "eval"):
        return node_id, kind, node_id.split("@")[0], None
    if kind == "model":
        return node_id, "model", node_id.split("@")[0], vault.home.artifacts / "models" / node_id
    if kind == "gguf":
        model, _, qtype = node_id.partition(":")
        return node_id, "gguf", f"{model.split('@')[0]}.{qtype}", gguf_dir(vault.home.artifacts, node_id)
    raise UsageError(f"{ref} is a {kind}; bundles carry models and GGUF files here",  # not in BUNDLED
                     "bundle the model made from it instead")


BUNDLED = ("model", "gguf", "dataset", "eval")  # the kinds of lineage node a bundle carries


@contextmanager
def exported(vault, action: str, ids: list[str], out: str | Path) -> Iterator[Path]:
    """A report or plot an operator asked for (`--out`): written where asked, never inside the home (where
    nothing derived stays in the clear), and audited once it is written."""
    out = Path(out)
    if vault.home.root.resolve() in out.absolute().resolve().parents:
        raise UsageError(f"{out} is inside the home", "write reports and plots outside the appliance's home")
    yield out
    with vault.transaction():
        vault.audit(action, list(ids), {"out": str(out)})


def export_plain(vault, ref: str, out: Path) -> dict:
    """The files of a model, adapter, tokenizer or GGUF as plain files in `out` (a new directory): the one way
    plaintext of an artifact leaves the sealed store besides a bundle. Audited before the directory appears."""
    from appliance import refs
    from appliance.home import atomic_dir
    from appliance.quantize.stage import gguf_dir
    from appliance.vault import lineage

    node_id = refs.node(vault.con, ref, ("model", "adapter", "tokenizer", "gguf"),
                        "model, adapter, tokenizer or GGUF")
    kind = lineage.kind_of(vault.con, node_id)
    src = gguf_dir(vault.home.artifacts, node_id) if kind == "gguf" else \
        vault.home.artifacts / ("tokenizers" if kind == "tokenizer" else "models") / node_id
    if not src.is_dir():
        raise BundleRefused(f"the files of {node_id} are missing from {src}", "restore them from a backup")
    out = Path(out)
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists", "pass a new directory with --out")
    if vault.home.root.resolve() in out.absolute().resolve().parents or out.absolute().resolve() == \
            vault.home.root.resolve():
        raise UsageError(f"{out} is inside the home", "export to a directory outside the home: nothing derived "
                                                     "stays in the clear there")
    if sealed.is_sealed(src):
        sealed.need(src).check(src)  # the whole set of files, not each one alone: a removed one is said here
    names = sealed.sealed_names(src) if sealed.is_sealed(src) else \
        sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    total = 0
    with atomic_dir(out) as tmp:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with sealed.opened(src / name) as plain, open(plain, "rb") as f, \
                    open(tmp / name, "xb", opener=lambda p, fl: os.open(p, fl | os.O_NOFOLLOW, 0o600)) as g:
                while piece := f.read(4 << 20):
                    g.write(piece)
                    total += len(piece)
        with vault.transaction():  # the record first: no plaintext copy without its audit entry
            vault.audit("model.export", [node_id], {"out": str(out), "files": len(names), "bytes": total})
    return {"id": node_id, "kind": kind, "out": str(out), "files": names, "bytes": total}


@bundle_errors()
def export_bundle(vault, ref: str, sign_key: str, recipients: list[Path | PublicKey], out: Path,
                  expires_days: float = 365, reserved: bool = False) -> dict:
    """Write the bundle of `ref` to `out` (which must not exist, unless `reserved`: created empty by us)."""
    from appliance.vault import lineage

    node_id, kind, name, src = _what(vault, ref)
    if out.exists() and not reserved:
        raise UsageError(f"{out} already exists", "pass another --out")
    recips = [r if isinstance(r, PublicKey) else PublicKey.load(r) for r in recipients]
    if kind == "dataset":
        if not recips:  # vault text leaves the box only encrypted
            raise UsageError(f"{node_id} is vault data: a dataset bundle must be encrypted",
                             "add --to RECIPIENT.pub (the receiving site's public key)")
        from appliance.vault.transfer import dataset_files

        files, _ = dataset_files(vault.con, node_id)
    elif kind == "eval":
        files = [("eval.json", _eval_report(vault.con, node_id))]
    else:
        if not src.is_dir():
            raise BundleRefused(f"the files of {node_id} are missing from {src}", "restore them from a backup")
        if sealed.is_sealed(src):  # opened in memory: the bundle is the only place the files are written
            sealed.need(src).check(src)  # the whole set of files: a removed one is said, not left out
            files = [(name, sealed.read_bytes(src / name)) for name in sealed.sealed_names(src)]
        else:
            files = [(p.relative_to(src).as_posix(), p) for p in sorted(src.rglob("*")) if p.is_file()]
    signer = secret_key(vault.home, sign_key)
    (last,) = vault.con.execute("SELECT max(version) FROM bundles_out WHERE name = ?", [name]).fetchone()
    version = (last or 0) + 1
    tree = lineage.tree(vault.con, node_id)
    m = container.create(out, kind, name, version, files, signer, {"id": node_id, "tree": _trim(tree)}, recips,
                         expires_days)
    with vault.transaction():
        vault.con.execute("INSERT INTO bundles_out VALUES (?, ?, ?, ?, ?, ?, ?)",
                          [name, version, node_id, kind, str(out), signer.public.key_id, utcnow()])
        vault.audit("bundle.export", [node_id], {"name": name, "version": version, "out": str(out),
                                                  "signer": signer.public.key_id,
                                                  "recipients": [r.key_id for r in recips]})
    return {"id": node_id, "kind": kind, "name": name, "version": version, "out": str(out), "files": len(files),
            "bytes": sum(f["size"] for f in m["files"]), "signer": signer.public.key_id,
            "encrypted_to": [r.key_id for r in recips], "expires": m["expires"]}


OUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a file name: no '/', never '.' or '..'


@bundle_errors()
def outbox_target(home: Home, out: str, sign_key: str, recipients: list[str]) -> tuple[str, list[PublicKey]]:
    """An agent's export checked by name: (`out`, the recipients' keys); UsageError for anything else.

    `out` is a plain file name, new in HOME/outbox; `sign_key` one of the home's keys; each recipient the
    name of a trusted site (its key from the trust store, never a key file), and at least one: an agent's
    bundle is always encrypted."""
    if not isinstance(out, str) or not OUT_NAME.match(out):
        raise UsageError(f"out {out!r} is not a plain file name",
                         "name the file only (letters, digits, '.', '_', '-'); it lands in the home's outbox")
    if sign_key not in {k["name"] for k in list_keys(home)}:
        raise UsageError(f"no signing key named {sign_key!r}", "see `appliance keys list`")
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise UsageError("recipients are names of trusted sites", "see `appliance trust list`")
    keys = []
    for r in recipients:
        match = [t.key for t in _trust(home).entries if t.name == r]
        if not match:
            raise UsageError(f"no trusted site named {r!r}", "encrypt only to a site in `appliance trust list`, "
                                                            "by its name")
        keys.append(match[0])
    if not keys:  # whatever a bundle carries (model, GGUF, eval run, dataset) derives from vault data
        raise UsageError("an agent's bundle must be encrypted: it carries what was made from vault data",
                         "name the receiving site in `to` (a site in `appliance trust list`)")
    box = home.outbox
    if box.is_symlink() or (box.exists() and not box.is_dir()):
        raise UsageError(f"{box} is not a directory", "the operator makes the outbox a plain folder again")
    if os.path.lexists(box / out):
        raise UsageError(f"{out} already exists in the outbox", "pick another name")
    return out, keys


@bundle_errors()
def outbox_export(vault, ref: str, sign_key: str, out: str, recipients: list[str], expires_days: float = 365
                  ) -> dict:
    """An agent's export: the bundle of `ref` as HOME/outbox/OUT (see `outbox_target`)."""
    from bundles.safefile import create_at

    out, keys = outbox_target(vault.home, out, sign_key, recipients)
    root = os.open(vault.home.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir("outbox", 0o700, dir_fd=root)
        except FileExistsError:
            pass
        try:  # the folder itself, never a link in its place
            box = os.open("outbox", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        except OSError as e:
            raise UsageError(f"cannot open the outbox {vault.home.outbox}: {e.strerror or e}",
                             "the operator makes it a plain folder again") from None
    finally:
        os.close(root)
    try:
        try:  # reserve the name: created exclusively, never through a link (a planted one fails here)
            with bundle_errors():
                os.close(create_at(box, out, 0o600))
        except BundleRefused as e:
            raise UsageError(f"{out} cannot be created in the outbox: {e.message}", "pick another name") from None
        try:
            return export_bundle(vault, ref, sign_key, keys, vault.home.outbox / out, expires_days, reserved=True)
        except BaseException:
            os.unlink(out, dir_fd=box)  # our reservation (or our half-recorded bundle)
            raise
    finally:
        os.close(box)


def history(con) -> list[dict]:
    """Every bundle sent (`way` "out", with the `file` written) and received ("in"), newest first."""
    rows = con.execute("SELECT 'out', name, version, id, kind, file, created FROM bundles_out UNION ALL "
                       "SELECT 'in', name, version, id, kind, NULL, created FROM bundles_in "
                       "ORDER BY created DESC").fetchall()
    return [{"way": w, "name": n, "version": v, "id": i, "kind": k, "file": f, "created": iso(t)}
            for w, n, v, i, k, f, t in rows]


def _trim(t: dict) -> dict:
    """Lineage for the manifest: ids, kinds, roles and hashes (no local paths)."""
    return {"id": t["id"], "kind": t["kind"], "content_hash": t.get("content_hash"), "role": t.get("role"),
            "parents": [_trim(p) for p in t.get("parents", [])]}


# --- inspect, verify, import ------------------------------------------------------------------------
@bundle_errors()
def inspect(home: Home, path: Path) -> dict:
    """The manifest and who claims to have signed it, without trusting anything."""
    o = container.open_bundle(path, _maybe_identities(home, path))
    o.close()
    signer = o.manifest.get("signer")
    known = [t for t in trust_list(home) if t["key_id"] == signer]
    return {"encrypted": o.encrypted, "recipients": o.recipients, "manifest": o.manifest,
            "signer_trusted_as": known[0]["name"] if known else None}


def _last_in(con, kind: str, name: str, key_id: str) -> int | None:
    """Rollback is tracked per (kind, name, signer): one signer cannot block another's releases."""
    (v,) = con.execute("SELECT max(version) FROM bundles_in WHERE kind = ? AND name = ? AND signer = ?",
                       [kind, name, key_id]).fetchone()
    return v


@bundle_errors()
def verify_bundle(vault, path: Path) -> dict:
    def decide(m: dict, signer) -> container.Plan:
        return container.Plan(_last_in(vault.con, m["kind"], m["name"], signer.key.key_id))

    store, own = _trust_and_own_keys(vault.home)
    v = container.verify(path, store, _maybe_identities(vault.home, path), decide=decide)
    return {**_summary(v), "own_key": own.get(v.signer.key.key_id)}


def _trust_and_own_keys(home: Home) -> tuple[TrustStore, dict[str, str]]:
    """The trust store plus this home's own public keys (HOME/keys/*.pub, for every kind), so a site checks its
    own bundle before it goes on the media; {key id: key name} of the own keys not otherwise trusted. Only
    `verify` reads it: an import still needs a trust entry."""
    from bundles.manifest import KINDS
    from bundles.trust import Trusted

    store = _trust(home)
    trusted = {t.key.key_id for t in store.entries}
    own = [Trusted(k["name"], PublicKey.load(Path(k["public"])), KINDS) for k in list_keys(home)
           if k["key_id"] not in trusted]
    return TrustStore(store.entries + own), {t.key.key_id: t.name for t in own}


def _maybe_identities(home: Home, path: Path) -> list[SecretKey]:
    with open(path, "rb") if path.is_file() else open(os.devnull, "rb") as f:
        return _identities(home) if f.read(len(container.ENC_MAGIC)) == container.ENC_MAGIC else []


def _summary(v) -> dict:
    m = v.manifest
    return {"kind": m["kind"], "name": m["name"], "version": m["version"], "files": len(m["files"]), "bytes": v.size,
            "signer": v.signer.name, "key_id": v.signer.key.key_id, "encrypted": v.encrypted,
            "created": m["created"], "expires": m["expires"], "source": m.get("lineage", {}).get("id")}


@bundle_errors()
def import_bundle(vault, path: Path, allow_downgrade: bool = False) -> dict:
    """Verify, then land the files atomically and record lineage, provenance and audit.

    Everything (kind, name, destination, rollback) is decided from the manifest as verified, in the same
    read of the file that checks every byte.
    """
    from appliance.vault import lineage
    from appliance.vault.ingest import validate_name

    got: dict = {}

    def decide(m: dict, signer) -> container.Plan:
        kind, name = m["kind"], m["name"]
        validate_name(name, "bundle")
        last = _last_in(vault.con, kind, name, signer.key.key_id)
        got.update(last=last)
        if kind == "dataset":
            if not m["recipients"]:
                raise BundleRefused("a dataset bundle must arrive encrypted", "ask the sender to export it with --to")
            got["files"] = {}
            return container.Plan(last, collect=got["files"])
        if kind == "eval":
            got["files"] = {}
            return container.Plan(last, collect=got["files"])
        if kind == "installer":
            raise BundleRefused("an installer bundle is not imported: it installs the appliance itself",
                              "python -m bundles unpack FILE --trust KEY --to DIR, then sh DIR/install.sh")
        if kind not in ("model", "gguf"):
            raise BundleRefused(f"{kind} bundles cannot be imported into this appliance",
                              "import models, GGUFs, datasets and eval reports")
        got["id"] = lineage.next_id(vault.con, name)
        got["dest"] = vault.home.artifacts / ("models" if kind == "model" else "gguf") / got["id"]
        if os.path.lexists(got["dest"]):
            raise BundleRefused(f"{got['dest']} already exists", "remove what a crash left there, then import")
        # sealed into the artifacts as the bytes stream in: never in the clear, never whole in memory
        r = got["receiving"] = sealed.Receiving(vault.store, got["dest"])
        return container.Plan(last, sink=r.file, publish=r.publish, discard=r.discard)

    v = container.verify(path, _trust(vault.home), _maybe_identities(vault.home, path),
                         allow_downgrade=allow_downgrade, decide=decide)
    m = v.manifest
    downgrade = got["last"] is not None and m["version"] <= got["last"]
    prov = {"imported_from": lineage.sender_id(m["lineage"].get("id")), "bundle": {
        "name": m["name"], "version": m["version"], "signer": v.signer.name, "key_id": v.signer.key.key_id,
        "manifest_sha256": v.manifest_sha256, "created": m["created"]}}

    def record(con, node_id: str) -> None:
        con.execute("INSERT INTO bundles_in VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [m["name"], m["version"], node_id, m["kind"], v.signer.key.key_id, v.manifest_sha256, utcnow()])

    if m["kind"] == "dataset":
        from appliance.vault.transfer import import_dataset

        res = import_dataset(vault, got["files"], m["name"], {**prov, "downgrade": downgrade}, on_commit=record)
        return {**_summary(v), "id": res["version"], "path": None, "downgrade": downgrade, "records": res["records"]}
    if m["kind"] == "eval":
        return _import_eval(vault, got["files"], m, v, prov, record, downgrade)
    dest, node_id = got["dest"], got["id"]
    try:
        with vault.transaction():
            attrs = {**_sender_report(dest, m["kind"]), **prov, "path": str(dest),
                     "source_lineage": m.get("lineage", {}).get("tree")}
            lineage.add_node(vault.con, node_id, m["kind"], [], content_hash=v.manifest_sha256, attrs=attrs)
            record(vault.con, node_id)
            vault.audit("bundle.import", [node_id], {"name": m["name"], "version": m["version"],
                                                      "signer": v.signer.name, "manifest_sha256": v.manifest_sha256,
                                                      "downgrade": downgrade})
            if m["kind"] == "gguf" and prov["imported_from"]:
                _index_sender(dest.parent, prov["imported_from"], node_id)
    except BaseException:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)
        raise
    return {**_summary(v), "id": node_id, "path": str(dest), "downgrade": downgrade}


def _index_sender(gguf_root: Path, sender: str, node_id: str) -> None:
    """Remember which imported GGUF answers to a sender's id, for generate/chat/serve, which find GGUFs
    without the vault. Written by this importer only, from the validated id: nothing a bundle carries."""
    from appliance.home import atomic_file
    from appliance.vault.lineage import SENDERS_INDEX

    index = gguf_root / SENDERS_INDEX
    try:
        known = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = {k: v for k, v in known.items() if isinstance(k, str) and isinstance(v, str)}
    known[sender] = node_id
    with atomic_file(index) as f:
        f.write(json.dumps(known, indent=1, sort_keys=True).encode())


def _eval_report(con, run_id: str) -> bytes:
    """An evaluation run as one JSON file: its summary and every case."""
    (summary,) = con.execute("SELECT summary FROM eval_runs WHERE id = ?", [run_id]).fetchone()
    cols = ["case_id", "passed", "output", "ttft_ms", "total_ms", "tokens", "scores"]
    cases = [dict(zip(cols, r)) for r in con.execute(
        f"SELECT {', '.join(cols)} FROM eval_cases WHERE run = ? ORDER BY rowid", [run_id]).fetchall()]
    return json.dumps({"summary": json.loads(summary), "cases": cases}, indent=1).encode()


def _import_eval(vault, files: dict, m: dict, v, prov: dict, record, downgrade: bool) -> dict:
    """An evaluation run made elsewhere: stored like a local one, with where it came from."""
    from appliance.vault import lineage

    try:
        report = json.loads(files["eval.json"])
        summary, cases = report["summary"], report["cases"]
    except (KeyError, ValueError) as e:
        raise BundleRefused(f"the eval report in the bundle is malformed ({e})", "ask the sender to export it again"
                          ) from None
    con = vault.con
    with vault.transaction():
        run_id = lineage.next_id(con, m["name"])
        summary = {**summary, "id": run_id, "imported_from": lineage.sender_id(m["lineage"].get("id"))}
        con.execute("INSERT INTO eval_runs VALUES (?, ?, ?, ?, ?, ?)",
                    [run_id, summary["suite"], summary["model"], summary["backend"], utcnow(), json.dumps(summary)])
        for c in cases:
            con.execute("INSERT INTO eval_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, c["case_id"], c["passed"], c["output"], c["ttft_ms"], c["total_ms"], c["tokens"],
                         c["scores"]])
        numbers = {k: x for k, x in summary["metrics"].items() if not isinstance(x, list | str)}
        lineage.add_node(con, run_id, "eval", [], content_hash=v.manifest_sha256,
                         attrs={**prov, "suite": summary["suite"], "model": summary["model"], "metrics": numbers,
                                "source_lineage": m.get("lineage", {}).get("tree")})
        record(con, run_id)
        vault.audit("bundle.import", [run_id], {"kind": "eval", "name": m["name"], "version": m["version"],
                                                 "signer": v.signer.name, "downgrade": downgrade})
    return {**_summary(v), "id": run_id, "path": None, "downgrade": downgrade, "records": len(cases)}


def _sender_report(dest: Path, kind: str) -> dict:
    """A GGUF's type, size and quality report as the sender measured them (its appliance.json)."""
    if kind != "gguf" or not sealed.exists(dest / "appliance.json"):
        return {}
    try:
        result = json.loads(sealed.read_bytes(dest / "appliance.json")).get("result", {})
    except ValueError:
        return {}
    keep = ("type", "size", "bits_per_weight", "params", "tensor_types", "fallbacks", "quality", "imatrix")
    path = next(iter(n for n in sealed.sealed_names(dest) if n.endswith(".gguf")), None)
    path = dest / path if path else None
    return {k: result[k] for k in keep if k in result} | ({"gguf_path": str(path)} if path else {})
