"""`appliance keys`, `appliance trust`, `appliance bundle`: thin over `appliance.api` (exchange)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import api
from appliance.api.format import human_bytes
from appliance.cli.app import Ctx, cli, command
from appliance.cli.output import out, table

KINDS = "model,gguf,dataset,eval"


@cli.group("keys")
def keys_group():
    """Signing keys (Ed25519) that also receive encrypted bundles (X25519); sealed under a passphrase."""


@command(keys_group, "generate")
@click.option("--name", required=True, help="Key name, e.g. the site's name.")
def keys_generate_cmd(c: Ctx, name):
    """Make a key pair; the secret half is sealed under APPLIANCE_KEY_PASSPHRASE[_FILE] (or a prompt)."""
    with c.open_vault() as v:
        res = api.keys_generate(v, name)
    c.emit(res, f"key {name} ({res['key_id']}); public key: {res['public']}")


@command(keys_group, "list")
def keys_list_cmd(c: Ctx):
    """The keys in this home."""
    keys = api.keys_list_at(c.home)["keys"]
    c.emit({"keys": keys}, lambda: table(["name", "key id", "public key file"],
                                          [[k["name"], k["key_id"], k["public"]] for k in keys])
           if keys else out.print("no keys yet: `appliance keys generate --name SITE`"))


@command(keys_group, "export-public")
@click.argument("name")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="Write it here (default: "
                                                                                       "print it).")
def keys_export_cmd(c: Ctx, name, out_path):
    """The public key file other sites trust (`appliance trust add`) or encrypt to (`--to`)."""
    import json

    res = api.keys_export_public_at(c.home, name, out_path)
    c.emit(res, f"wrote {out_path}" if out_path else json.dumps(res["public"], indent=2))


@cli.group("trust")
def trust_group():
    """Signers whose bundles this appliance accepts, each for the kinds it may sign."""


@command(trust_group, "add")
@click.argument("pub_file", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="A name for the signer (the sending site).")
@click.option("--kinds", default=KINDS, show_default=True, help="Comma-separated kinds it may sign.")
def trust_add_cmd(c: Ctx, pub_file, name, kinds):
    """Trust a public key file for some kinds of bundle."""
    with c.open_vault() as v:
        entry = api.trust_add(v, pub_file, name, [k.strip() for k in kinds.split(",") if k.strip()])
    c.emit(entry, f"trusting {name} ({entry['key_id']}) for {', '.join(entry['kinds'])}")


@command(trust_group, "list")
def trust_list_cmd(c: Ctx):
    """Trusted signers."""
    rows = api.trust_list_at(c.home)["trusted"]
    c.emit({"trusted": rows}, lambda: table(["name", "key id", "kinds"],
                                             [[t["name"], t["key_id"], ", ".join(t["kinds"])] for t in rows])
           if rows else out.print("nobody is trusted yet: `appliance trust add FILE.pub --name SITE`"))


@command(trust_group, "remove")
@click.argument("name")
def trust_remove_cmd(c: Ctx, name):
    """Stop trusting a signer."""
    with c.open_vault() as v:
        entry = api.trust_remove(v, name)
    c.emit(entry, f"no longer trusting {name} ({entry['key_id']})")


@cli.group("bundle")
def bundle_group():
    """Signed, optionally encrypted bundles that carry models, GGUF files and datasets across an air gap."""


@command(bundle_group, "export")
@click.argument("ref")
@click.option("--sign-key", required=True, help="Name of the key that signs (see `appliance keys list`).")
@click.option("--to", "recipients", multiple=True, type=click.Path(path_type=Path),
              help="Encrypt to this public key file (repeatable).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path))
@click.option("--expires-days", type=click.FloatRange(0.01, 3650), default=365, show_default=True)
def bundle_export_cmd(c: Ctx, ref, sign_key, recipients, out_path, expires_days):
    """Bundle a model (NAME@K), a GGUF (NAME@K:TYPE), an eval run (eval-SUITE@K) or a dataset version
    (NAME@N, encrypted only), with its lineage, signed, into one file."""
    with c.open_vault() as v:
        r = api.bundle_export(v, ref, sign_key, out_path, list(recipients), expires_days)
    c.emit(r, f"{r['out']}: {r['kind']} {r['name']} v{r['version']} ({r['files']} files, {human_bytes(r['bytes'])})"
              f", signed by {r['signer']}" + (f", encrypted to {', '.join(r['encrypted_to'])}"
                                              if r["encrypted_to"] else ""))


@command(bundle_group, "inspect")
@click.argument("file", type=click.Path(path_type=Path))
def bundle_inspect_cmd(c: Ctx, file):
    """Show the manifest, signer and lineage without trusting or unpacking anything."""
    info = api.bundle_inspect_at(c.home, file)
    m = info["manifest"]

    def human():
        out.print(f"[bold]{m['kind']} {m['name']} v{m['version']}[/]  created {m['created']}, expires {m['expires']}")
        out.print(f"signer {m['signer']}"
                  + (f" (trusted here as {info['signer_trusted_as']})" if info["signer_trusted_as"] else
                     " (not trusted here)") + (f"; encrypted to {', '.join(info['recipients'])}"
                                               if info["encrypted"] else ""))
        out.print(f"from {m.get('lineage', {}).get('id')}")
        table(["path", "size", "digest"], [[f["path"], human_bytes(f["size"]), f["digest"][:32]] for f in m["files"]])

    c.emit(info, human)


@command(bundle_group, "verify")
@click.argument("file", type=click.Path(path_type=Path))
def bundle_verify_cmd(c: Ctx, file):
    """Check signature, trust, expiry, version and every byte; changes nothing."""
    with c.open_vault(read_only=True) as v:
        r = api.bundle_verify(v, file)
    by = (f"signed by this home's own key {r['own_key']} ({r['key_id']}); a receiving site must trust its public "
          f"key (`appliance keys export-public {r['own_key']}`)" if r.get("own_key")
          else f"signed by {r['signer']} ({r['key_id']})")
    c.emit(r, f"ok: {r['kind']} {r['name']} v{r['version']}, {r['files']} files, {human_bytes(r['bytes'])}, {by}")


@command(bundle_group, "import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--allow-downgrade", is_flag=True, help="Accept a version not newer than the last imported "
                                                      "(audited).")
def bundle_import_cmd(c: Ctx, file, allow_downgrade):
    """Verify, then land the bundle's files in this home atomically, with lineage and an audit entry."""
    with c.open_vault() as v:
        r = api.bundle_import(v, file, allow_downgrade)
    unit = "cases" if r["kind"] == "eval" else "records"
    where = f" ({r['path']})" if r.get("path") else f" ({r['records']} {unit}, in the vault)"
    c.emit(r, f"imported {r['kind']} {r['name']} v{r['version']} as {r['id']}{where}, signed by {r['signer']}"
              + (" (a downgrade, as allowed)" if r["downgrade"] else ""))
