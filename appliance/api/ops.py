"""The box and the home: opening the vault, doctor, backups and restores, the offline wheelhouse."""

from __future__ import annotations

from pathlib import Path

from appliance.home import Home
from appliance.schemas import JSON_SCHEMA_VERSION  # noqa: F401 - the "schema" of every --json object


def open(home: str | Path, passphrase: str, read_only: bool = False):  # noqa: A001 - mirrors Vault.open
    """The unlocked vault (a context manager) that every function here takes first."""
    from appliance.vault import Vault

    return Vault.open(Home(Path(home).expanduser().absolute()), passphrase, read_only=read_only)


def doctor(home: str | Path, passphrase: str | None = None) -> dict:
    """Every check of the box (no vault needed; with a passphrase the vault is checked read-only too)."""
    from appliance.doctor import run

    return run(Home(Path(home).expanduser().absolute()), passphrase)


def wheelhouse_build(out: str | Path, torch: str | None = None, from_env: bool = False,
                     find_links: list[str | Path] | None = None, no_index: bool = False,
                     torch_index: str | None = None, sign_key: str | None = None, bundle: str | Path | None = None,
                     force: bool = False, home: str | Path | None = None, compress_level: int = 1,
                     progress=None) -> dict:
    """Every wheel the appliance runs on, hash-pinned, with an install script (and, with `sign_key` and
    `bundle`, one signed installer bundle); `home` holds the signing key."""
    from appliance.home import default_home
    from appliance.wheelhouse import build

    h = Home(Path(home or default_home()).expanduser().absolute())
    return build(Path(out), torch, from_env, [Path(p) for p in find_links or []], no_index, torch_index, sign_key,
                 None if bundle is None else Path(bundle), force, h, progress, compress_level)


def vault_backup(v, out: str | Path, no_checkpoints: bool = False, force: bool = False, progress=None) -> dict:
    """An encrypted, verifiable snapshot of the home to `out`: vault, wrapped keys, models, logs, keys, trust."""
    from appliance.vault.backup import backup

    return backup(v, Path(out), not no_checkpoints, force, **({"progress": progress} if progress else {}))


def vault_restore(backup_file: str | Path, home: str | Path, passphrase: str, force: bool = False) -> dict:
    """A backup brought back as `home` (no open vault: it makes one); checked before it takes the name."""
    from appliance.vault.restore import restore

    return restore(Path(backup_file), Home(Path(home).expanduser().absolute()), passphrase, force)


def overview(v, jobs_ended: int = 3, audit: int = 6) -> dict:
    """The box at a glance (the console's dashboard): the vault file's size; its committed datasets and
    versions; `records`, the versions' records summed (each counted as `vault show` counts it, so a record
    kept in two versions counts twice) and `distinct_records`, each stored text once; models and adapters,
    GGUFs, eval runs; the running and queued jobs, then the last `jobs_ended` ended (as `jobs_list` gives
    them); the newest `audit` entries, newest first (each as `audit_log` gives it). Reads only: no job is
    dispatched."""
    from appliance.eval.run import count as eval_count
    from appliance.jobs import queue
    from appliance.vault import audit as audit_log
    from appliance.vault import lineage
    from appliance.vault.versions import totals

    con = v.con
    jobs = queue.listing(con, ("running", "queued")) + queue.listing(con, queue.FINAL, limit=jobs_ended)
    return {"size": v.home.database.stat().st_size, **totals(con),
            "models": lineage.count(con, ("model", "adapter")), "ggufs": lineage.count(con, ("gguf",)),
            "evals": eval_count(con), "jobs": [j.to_json() for j in jobs],
            "audit": audit_log.entries(con, audit)[::-1]}


# --- before (or without) a vault: the home, passphrases, the process, logs, the version ----------------------
def version() -> str:
    """The appliance's version (`appliance --version`)."""
    from appliance import __version__

    return __version__


def home(path: str | Path | None = None) -> Home:
    """The appliance home at `path` (default: $APPLIANCE_HOME, else ~/.local/share/appliance), made absolute."""
    from appliance.home import default_home

    return Home(Path(path or default_home()).expanduser().absolute())


def init(home: str | Path | Home, passphrase: str, kdf_memory_mib: int = 64, kdf_iterations: int = 3) -> dict:
    """A new encrypted vault at `home` (`appliance init`): its id and KDF parameters (the salt left out).

    Refused when a vault is there already, or the passphrase is too short."""
    from appliance.errors import VaultError
    from appliance.passphrase import check_new
    from appliance.vault import Vault

    h = home if isinstance(home, Home) else Home(Path(home).expanduser().absolute())
    if h.exists():
        raise VaultError(f"a vault already exists at {h.root}", "use it, or pick another --home")
    kdf = {"name": "argon2id", "memory_kib": kdf_memory_mib * 1024, "iterations": kdf_iterations, "lanes": 4}
    with Vault.init(h, check_new(passphrase), kdf) as v:
        return {"home": str(h.root), "vault_id": v.keyring.vault_id,
                "kdf": {k: val for k, val in v.keyring.kdf.items() if k != "salt"}}


def get_passphrase(confirm: bool = False, prefix: str = "APPLIANCE_PASSPHRASE", label: str = "passphrase") -> str:
    """The passphrase from `{prefix}_FILE`, `{prefix}` or a terminal prompt, in that order (never a flag);
    `confirm` asks twice at a prompt. The process is protected (no core dumps) before it holds it."""
    from appliance.passphrase import get_passphrase as get

    return get(confirm, prefix, label)


def secret_from_env(prefix: str) -> str | None:
    """A secret from the file named by `{prefix}_FILE`, else `{prefix}` itself; None when neither is set."""
    from appliance.passphrase import from_env

    return from_env(prefix)


def check_new_passphrase(value: str) -> str:
    """`value` when it will do as a new passphrase (long enough); an error saying why not otherwise."""
    from appliance.passphrase import check_new

    return check_new(value)


def protect_process() -> None:
    """No core dumps, and this process's memory and environment readable by root only: it may hold keys."""
    from appliance.hardening import protect_process as protect

    protect()


def log_setup(logs_dir: str | Path, verbose: bool = False) -> None:
    """Send the appliance's log events to `logs_dir` (and to stderr with `verbose`); no vault content, no
    secrets."""
    from appliance import logs

    logs.setup(logs_dir, verbose)


def log_event(name: str, level: int = 20, **fields) -> None:
    """One structured log event (`level` as in `logging`: 20 info, 30 warning, 40 error)."""
    from appliance import logs

    logs.event(name, level, **fields)


def log_debug(name: str, **fields) -> None:
    """One debug log event (shown with --verbose)."""
    from appliance import logs

    logs.debug(name, **fields)


# --- the sample corpus and the contract ------------------------------------------------------------------
def samples(out: str | Path, seed: int = 7) -> dict:
    """Write the synthetic sample corpus (fake data, fake PII) to `out`, a new or empty directory."""
    from appliance.samples import generate

    return generate(Path(out), seed)


def schema(command: str | None = None) -> dict:
    """The JSON Schema of `command`'s --json output ("vault show"), or with no command the list of them and
    the error object's schema (`appliance schema [COMMAND]`)."""
    from appliance import schemas

    if command is None:
        return {"version": JSON_SCHEMA_VERSION, "commands": schemas.commands(), "error": schemas.ERROR}
    return {"command": command, "version": JSON_SCHEMA_VERSION, "json_schema": schemas.schema(command)}
