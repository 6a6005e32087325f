"""Exchange across the air gap: signing keys, trusted senders, bundles in and out."""

from __future__ import annotations

from pathlib import Path


def keys_generate(v, name: str) -> dict:
    """A signing key pair; the secret half is sealed under APPLIANCE_KEY_PASSPHRASE[_FILE]."""
    from appliance.exchange import generate_key, keys_dir

    pub = generate_key(v, name)
    return {"name": name, "key_id": pub.key_id, "public": str(keys_dir(v.home) / f"{name}.pub")}


def keys_list(v) -> dict:
    from appliance.exchange import list_keys

    return {"keys": list_keys(v.home)}


def keys_export_public(v, name: str, out: str | Path | None = None) -> dict:
    """The public key other sites trust or encrypt to; written to `out` when given."""
    from appliance.exchange import export_public

    return export_public(v.home, name, out)


def trust_add(v, pub_file: str | Path, name: str, kinds: list[str] | None = None) -> dict:
    from appliance.exchange import trust_add as add

    return add(v, Path(pub_file), name, ["model", "gguf", "dataset", "eval"] if kinds is None else kinds)


def trust_list(v) -> dict:
    from appliance.exchange import trust_list as listing

    return {"trusted": listing(v.home)}


def trust_remove(v, name: str) -> dict:
    from appliance.exchange import trust_remove as remove

    return remove(v, name)


def bundle_inspect(v, file: str | Path) -> dict:
    """The manifest, signer and lineage of a bundle, without trusting or unpacking anything."""
    from appliance.exchange import inspect

    return inspect(v.home, Path(file))


def bundle_verify(v, file: str | Path) -> dict:
    from appliance.exchange import verify_bundle

    return verify_bundle(v, Path(file))


def bundle_import(v, file: str | Path, allow_downgrade: bool = False) -> dict:
    from appliance.exchange import import_bundle

    return import_bundle(v, Path(file), allow_downgrade)


def bundle_export(v, ref: str, sign_key: str, out: str | Path, to: list[str | Path] | None = None,
                  expires_days: float = 365, to_sites: list[str] | None = None) -> dict:
    """Sign `ref` into a bundle at `out`, encrypted to the public key files `to` and to the trusted sites
    named in `to_sites` (as `trust_list` names them)."""
    from appliance.exchange import export_bundle, trusted_key

    keys = [trusted_key(v.home, site) for site in to_sites or []] + [Path(p) for p in to or []]
    return export_bundle(v, ref, sign_key, keys, Path(out).expanduser(), expires_days)


def model_export(v, ref: str, out: str | Path) -> dict:
    """A model, adapter, tokenizer or GGUF as plain files in the new directory `out` (`appliance model export`):
    audited, like `vault export`; bundles stay the way models cross the air gap."""
    from appliance.exchange import export_plain

    return export_plain(v, ref, Path(out))


def bundle_history(v) -> dict:
    """Every bundle sent (`way` "out", with the `file` written) and received ("in"), newest first."""
    from appliance.exchange import history

    return {"bundles": history(v.con)}


def using_key_passphrase(passphrase: str):
    """A context manager: signing keys opened inside it (`keys_generate`, `bundle_export`, and the
    `bundle_verify` and `bundle_import` of a bundle encrypted to this site) use `passphrase`, never
    APPLIANCE_KEY_PASSPHRASE[_FILE] or a prompt (the console asks for it in a dialog)."""
    from bundles.keys import using_passphrase

    return using_passphrase(passphrase)


# --- the same reads without an open vault: keys, trust and a bundle's manifest need only the home ------------
def _home(home):
    from appliance.home import Home

    return home if isinstance(home, Home) else Home(Path(home).expanduser().absolute())


def keys_list_at(home) -> dict:
    """`keys_list` for the home at `home` (a path or `ops.home()`), with no vault opened: no passphrase."""
    from appliance.exchange import list_keys

    return {"keys": list_keys(_home(home))}


def keys_export_public_at(home, name: str, out: str | Path | None = None) -> dict:
    """`keys_export_public` for the home at `home`, with no vault opened."""
    from appliance.exchange import export_public

    return export_public(_home(home), name, out)


def trust_list_at(home) -> dict:
    """`trust_list` for the home at `home`, with no vault opened."""
    from appliance.exchange import trust_list as listing

    return {"trusted": listing(_home(home))}


def bundle_inspect_at(home, file: str | Path) -> dict:
    """`bundle_inspect` for the home at `home` (whose trust store names the signer), with no vault opened."""
    from appliance.exchange import inspect

    return inspect(_home(home), Path(file))
