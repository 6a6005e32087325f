"""`appliance doctor`: is this box fit to run the appliance? Each check is ok, warn or fail, with the fix.

Written for an operator who is not an ML engineer: every line says what was looked at, what was found,
and (when it is not ok) the one thing to do about it. Nothing here changes the box or the vault; the
vault is opened read-only, and only when a passphrase is at hand.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC
from importlib import metadata
from pathlib import Path

from appliance.home import Home

GIB = 1 << 30
# what one stage alone needs: missing, it is a warning; any other dependency missing is a failure
OPTIONAL = {"llama-cpp-python": "GGUF quality checks and edge inference", "peft": "LoRA and QLoRA",
            "bitsandbytes": "QLoRA", "textual": "the console", "mcp": "agents over MCP", "matplotlib": "plots"}
EARLIEST = 1_767_225_600  # 2026-01-01: a clock before this release was made is wrong


@dataclass
class Check:
    check: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def run(home: Home, passphrase: str | None = None) -> dict:
    """Every check, in order; `ok` is false when any failed (warnings do not)."""
    checks: list[Check] = []
    for fn in (_python, _packages, _torch, _duckdb, _llama, _user, _swap, _cores):
        checks += _safely(fn, fn.__name__.strip("_"))
    checks += _safely(lambda: _disk(home), "disk")
    checks += _safely(lambda: _home(home), "home")
    checks += _safely(lambda: _backups(home), "backups")
    checks += _safely(lambda: _vault(home, passphrase), "vault")
    if not any(c.check == "clock" for c in checks):  # the vault was not opened: the clock against the release
        checks += _clock(None)
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    return {"ok": counts["fail"] == 0, "home": str(home.root), "counts": counts, "checks": [asdict(c) for c in checks]}


def _safely(fn: Callable[[], list[Check]], name: str) -> list[Check]:
    try:
        return fn()
    except PermissionError as e:
        return [Check(name, "fail", f"permission denied: {e.filename or e}",
                      "run doctor as the user that owns the appliance's home")]
    except Exception as e:  # noqa: BLE001 - a check that breaks is itself a finding, not the end of the report
        return [Check(name, "fail", f"the check itself failed: {type(e).__name__}: {e}"[:300],
                      "report this with the output of `appliance doctor --json`")]


def _python() -> list[Check]:
    v = sys.version_info
    detail = f"Python {platform.python_version()} ({sys.executable})"
    if v < (3, 11):
        return [Check("python", "fail", detail, "install Python 3.11 or newer and set the appliance up again")]
    return [Check("python", "ok", detail)]


def lock_pins() -> dict[str, str]:
    """The versions requirements.lock pins (when the appliance runs from its source tree)."""
    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    pins: dict[str, str] = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                pins[_norm(name)] = ver.split(";")[0].strip()
    return pins


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _dependencies() -> list[str]:
    """The appliance's own declared dependencies (its installed metadata), extras left out."""
    import re

    names = []
    for req in metadata.requires("appliance") or []:
        if "extra ==" in req:
            continue
        names.append(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])
    return names


def _packages() -> list[Check]:
    pins = lock_pins()
    out = []
    for name in _dependencies():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in OPTIONAL:
                out.append(Check(f"package {name}", "warn", f"not installed: {OPTIONAL[name]} will not work",
                                 "run `make setup`"))
            else:
                out.append(Check(f"package {name}", "fail", "not installed", "run `make setup`"))
            continue
        want = pins.get(_norm(name))
        if want and want != have.split("+")[0]:  # a local build tag (2.13.0+cpu) is the same release
            out.append(Check(f"package {name}", "warn", f"{have}, but requirements.lock pins {want}",
                             "run `make setup` to install the pinned versions"))
        else:
            out.append(Check(f"package {name}", "ok", have + (" (pinned)" if want else "")))
    return out


def _torch() -> list[Check]:
    import torch
    import torch.distributed as dist

    out = [Check("torch", "ok", f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda
                                                                else ", CPU build"))]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        out.append(Check("gpus", "warn", "no GPU visible: training and evaluation run on the CPU",
                         "on a GPU box: check the NVIDIA driver (`nvidia-smi`) and that torch is a CUDA build"))
    else:
        mem = []
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            mem.append(f"{i}: {p.name} {p.total_memory / GIB:.0f} GiB")
        out.append(Check("gpus", "ok", f"{n} GPU(s): " + "; ".join(mem)))
    nccl = dist.is_available() and dist.is_nccl_available()
    if n > 1 and not nccl:
        out.append(Check("nccl", "fail", f"{n} GPUs but no NCCL in this torch build: multi-GPU training cannot run",
                         "install a CUDA build of torch"))
    else:
        out.append(Check("nccl", "ok", "available" if nccl else "not needed (one device or none); gloo is used on CPU"))
    return out


def _duckdb() -> list[Check]:
    import duckdb

    from appliance.errors import ApplianceError
    from appliance.vault.db import httpfs_extension_path

    try:
        path = httpfs_extension_path()
        con = duckdb.connect(":memory:", config={"allow_unsigned_extensions": "false",
                                                 "autoinstall_known_extensions": "false",
                                                 "autoload_known_extensions": "false"})
        try:
            con.execute(f"LOAD '{path}'")  # unsigned extensions are refused: a load is a signature that checks
        finally:
            con.close()
    except ApplianceError as e:
        return [Check("duckdb", "fail", f"DuckDB {duckdb.__version__}: {e.message}", e.hint or "run `make setup`")]
    except duckdb.Error as e:
        return [Check("duckdb", "fail", f"DuckDB {duckdb.__version__}: the httpfs extension did not load: "
                                        f"{str(e).splitlines()[0][:200]}",
                      "install the duckdb-ext-httpfs release built for this duckdb (`make setup`)")]
    return [Check("duckdb", "ok", f"DuckDB {duckdb.__version__}; its signed httpfs extension (OpenSSL, for the "
                                  "vault's encryption) loads with unsigned extensions refused")]


def _llama() -> list[Check]:
    from appliance.quantize.types import QuantizeError

    try:
        from appliance.quantize.llama import lib

        llama_cpp = lib()
    except QuantizeError as e:
        return [Check("llama.cpp", "fail", e.message, e.hint or "run `make setup`")]
    info = llama_cpp.llama_print_system_info()
    info = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    import re

    flags = sorted(set(re.findall(r"([A-Z][A-Z0-9_]*) = 1", info)))
    detail = f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}; CPU features: {', '.join(flags) or 'none'}"
    if not any(f.startswith("AVX") or f.startswith("NEON") for f in flags):
        return [Check("llama.cpp", "warn", detail, "this build uses no vector instructions: GGUF inference will be "
                                                   "slow; rebuild llama-cpp-python on this CPU")]
    return [Check("llama.cpp", "ok", detail)]


def _user() -> list[Check]:
    if os.geteuid() == 0:
        return [Check("user", "warn", "running as root: root can read any process's memory, so the tools of an "
                                      "agentic task could reach the vault's keys",
                      "run the appliance as an unprivileged user that owns the home")]
    return [Check("user", "ok", f"uid {os.geteuid()} (not root)")]


def _swap() -> list[Check]:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return [Check("swap", "ok", "no /proc/swaps (not Linux): not checked")]
    devices = [ln.split()[0] for ln in lines if ln.strip()]
    if devices:
        plain = [d for d in devices if not d.startswith("/dev/dm-") and not d.startswith("/dev/mapper/")]
        if plain:
            return [Check("swap", "warn", f"swap is on ({', '.join(plain)}): memory holding keys and plaintext could "
                                          "be written to disk", "turn it off (`swapoff -a`) or use encrypted swap")]
        return [Check("swap", "ok", f"swap on device-mapper ({', '.join(devices)}): encrypted, if it is dm-crypt")]
    return [Check("swap", "ok", "no swap")]


def _cores() -> list[Check]:
    """Appliance processes turn core dumps off for themselves (appliance.hardening); the box's own limit is
    what other programs of the appliance's user get, so it is named too."""
    from appliance.hardening import is_protected, protect_process

    box = _box_core_limit()
    protect_process()
    if not is_protected():
        return [Check("core dumps", "warn", "this process could not turn core dumps off: a crash could write keys "
                                            "and plaintext to disk",
                      "turn them off for the appliance's user (`ulimit -c 0`, or LimitCORE=0 in its service)")]
    return [Check("core dumps", "ok", "off in every appliance process (RLIMIT_CORE 0, not dumpable)"
                                      + (f"; the box allows {box} for other programs" if box else ""))]


def _box_core_limit() -> str:
    """The core limit this command was started with, as its parent has it (ours is 0 by now)."""
    try:
        for line in Path(f"/proc/{os.getppid()}/limits").read_text().splitlines():
            if line.startswith("Max core file size"):
                soft = line.split()[4]
                return "" if soft == "0" else f"{soft} bytes" if soft.isdigit() else soft
    except OSError:
        pass
    return ""


def _disk(home: Home) -> list[Check]:
    at = home.root
    while not at.exists() and at != at.parent:
        at = at.parent
    free = shutil.disk_usage(at).free
    detail = f"{free / GIB:.1f} GiB free at {at} (the vault, checkpoints and models)"
    if free < 2 * GIB:
        return [Check("disk", "fail", detail, "free space or move the home (--home) to a bigger disk")]
    if free < 20 * GIB:
        return [Check("disk", "warn", detail, "checkpoints of real models need tens of GiB: free space")]
    return [Check("disk", "ok", detail)]


def _home(home: Home) -> list[Check]:
    if not home.root.exists():
        return [Check("home", "warn", f"no appliance home at {home.root}", "run `appliance init` (or pass --home)")]
    loose = []
    for p in (home.root, home.tmp, home.logs, home.artifacts, home.keyring, home.database):
        if p.exists() and p.stat().st_mode & 0o077:
            loose.append(f"{p.name or p} {oct(p.stat().st_mode & 0o777)}")
        if p.exists() and p.stat().st_uid != os.geteuid():
            loose.append(f"{p.name or p} owned by uid {p.stat().st_uid}")
    if loose:
        return [Check("home", "fail", f"{home.root}: others can reach it: {', '.join(loose)}",
                      f"chmod -R go-rwx {home.root} (and run as the user that owns it)")]
    return [Check("home", "ok", f"{home.root}: private to its owner (0700 directories, 0600 files)")]


def _backups(home: Home) -> list[Check]:
    """Backups kept in the home (those made before a migration) carry the keyring as it was then."""
    kept = sorted((home.root / "backups").glob("*.backup")) if (home.root / "backups").is_dir() else []
    if not kept:
        return []
    return [Check("backups", "warn", f"{len(kept)} backup(s) in {home.root / 'backups'}: each opens with the "
                                     "passphrase and keys of its day, even after `vault passwd` or `vault rekey`",
                  "move them to protected backup media, or delete those you do not need")]


def _vault(home: Home, passphrase: str | None) -> list[Check]:
    if not home.keyring.exists():
        return []  # _home has said so
    if not passphrase:
        return [Check("vault", "warn", "locked: not opened, so its records, audit chain and clock were not checked",
                      "set APPLIANCE_PASSPHRASE or APPLIANCE_PASSPHRASE_FILE and run again")]
    from appliance.errors import ApplianceError, VaultBusy
    from appliance.vault import Vault, audit
    from appliance.vault.schema import SCHEMA_VERSION

    try:
        v = Vault.open(home, passphrase, read_only=True)
    except VaultBusy as e:
        return [Check("vault", "warn", f"not checked: {e.message}", "run doctor again when it is free")]
    except ApplianceError as e:
        return [Check("vault", "fail", f"cannot open: {e.message}", e.hint or "")]
    with v:
        (schema,) = v.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        rep = v.check()
        chain = audit.verify(v.con, v.secrets.audit_key)
        last = v.con.execute("SELECT ts FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    out = []
    detail = f"schema {schema} (this appliance: {SCHEMA_VERSION}); {rep.blobs} records, {rep.versions} versions"
    out.append(Check("vault", "ok", detail + " match their hashes") if rep.ok else
               Check("vault", "fail", detail + ": " + "; ".join(rep.problems[:3]),
                     "restore the vault from a backup; `appliance vault check` lists every problem"))
    out.append(Check("audit", "ok", f"{chain.entries} entries, hash chain intact") if chain.ok else
               Check("audit", "fail", "the audit chain is broken: " + "; ".join(chain.problems[:3]),
                     "the log was changed outside the appliance: keep the box as it is and report it"))
    out += _clock(last[0] if last else None)
    return out


def _clock(last) -> list[Check]:
    now = time.time()
    if now < EARLIEST:
        return [Check("clock", "fail", f"the clock says {time.strftime('%Y-%m-%d', time.gmtime(now))}, before this "
                                       "release was made", "set the date and time (bundle expiry depends on it)")]
    if last is not None:
        from datetime import datetime

        when = datetime.fromisoformat(str(last).replace("Z", "+00:00"))
        ts = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        if ts - now > 300:
            return [Check("clock", "fail", f"the newest audit entry is {ts - now:.0f} s in the future: the clock "
                                           "went back", "set the date and time (bundle expiry depends on it)")]
    return [Check("clock", "ok", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)) +
                  (", after the newest audit entry" if last is not None else ""))]
