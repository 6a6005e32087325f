"""`appliance wheelhouse build`: everything the appliance needs to install on a box that never sees a network.

A wheelhouse is one directory:

    wheels/           every distribution the appliance runs on, as wheels: the built llama.cpp wheel and the
                      package carrying DuckDB's signed httpfs extension among them
    requirements.txt  each of them pinned to its version and its file's sha256 (pip --require-hashes)
    install.sh        one virtual environment per release under a prefix, installed by `pip --no-index`
    wheelhouse.json   what it holds and what it was built for: Python, machine, torch build

The wheels come from the package index (`pip download`, on a connected machine: the default), or are packed
from the distributions installed in the running environment (`from_env`: no network at all, so the box
whose tests passed is the one that gets copied). A packed file must match the hash pip recorded when it
installed it, so a patched site-packages is refused rather than carried. Either way the set is then checked
whole before it takes its name: every wheel fits this Python and platform, and every requirement reached
from the appliance is met inside the wheelhouse.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from appliance.errors import ApplianceError, UsageError, bundle_errors
from appliance.home import file_sha256
from bundles.safefile import atomic_create

FORMAT = 1
ROOT = "appliance"
BUILDS = ("cpu", "cuda")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where PyTorch publishes its CPU-only builds
SKIP_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}  # written by pip at install time
EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip times: the same installed files pack to the same wheel bytes
CHUNK = 1 << 20
NO_PROGRESS = (lambda _n, _total: None, lambda _n, _item: None)  # (start, advance) that show nothing


class WheelhouseError(ApplianceError):
    pass


@dataclass(frozen=True)
class Pin:
    name: str  # canonical: lower case, runs of -_. as one -
    version: str
    dist: metadata.Distribution


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- what the appliance runs on ------------------------------------------------------------------------
def walk(root: str, requires, version, missing) -> list[str]:
    """Every distribution `root` needs at run time: its requirements and theirs, extras followed and markers
    evaluated for this interpreter, each version checked against what asked for it.

    `requires(key)` and `version(key)` read one distribution (`version` gives None when it is absent);
    `missing(name, wanted_by)` raises for an absent one. Returns the canonical names, in the order reached."""
    from packaging.requirements import Requirement

    extras_seen: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str], str]] = [(root, frozenset(), "")]
    while todo:
        name, extras, wanted_by = todo.pop()
        key = canonical(name)
        if key in extras_seen and extras <= extras_seen[key]:
            continue
        if version(key) is None:
            missing(name, wanted_by)
        extras_seen.setdefault(key, set()).update(extras)
        for text in requires(key):
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras_seen[key] or {""})):
                continue
            have = version(canonical(req.name))
            if have is None:
                missing(req.name, key)
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                raise WheelhouseError(f"{key} needs {req.name}{req.specifier}, but has {have}",
                                      f"install '{req.name}{req.specifier}' (`make setup`), then build again")
            todo.append((req.name, frozenset(req.extras), key))
    return list(extras_seen)


def closure(root: str = ROOT) -> dict[str, Pin]:
    """The installed distributions the appliance needs at run time."""
    dists: dict[str, metadata.Distribution | None] = {}

    def dist(key: str) -> metadata.Distribution | None:
        if key not in dists:
            try:
                dists[key] = metadata.distribution(key)
            except metadata.PackageNotFoundError:
                dists[key] = None
        return dists[key]

    keys = walk(root, lambda k: dist(k).requires or [], lambda k: d.version if (d := dist(k)) else None,
                _not_installed)
    return {k: Pin(k, dists[k].version, dists[k]) for k in sorted(keys)}


def _not_installed(name: str, wanted_by: str) -> None:
    raise WheelhouseError(f"{name} is not installed" + (f" (needed by {wanted_by})" if wanted_by else ""),
                          "run `make setup` first: the wheelhouse holds what this environment runs on")


def torch_build(pins: dict[str, Pin]) -> tuple[str, str]:
    """(version, "cpu" | "cuda") of the installed torch: PyTorch's CPU builds carry a +cpu tag."""
    pin = pins.get("torch")
    if pin is None:
        raise WheelhouseError("torch is not among the appliance's requirements", "run `make setup` first")
    local = pin.version.partition("+")[2]
    return pin.version, "cpu" if local == "cpu" or sys.platform == "darwin" else "cuda"


def _lock_mismatches(pins: dict[str, Pin]) -> list[str]:
    """Where the environment differs from requirements.lock (when the appliance runs from its source tree)."""
    from appliance.doctor import lock_pins

    lock = lock_pins()
    return [f"{n} {p.version} (lock: {lock[n]})" for n, p in pins.items()
            if n in lock and lock[n] != p.version.split("+")[0]]


# --- packing an installed distribution into a wheel --------------------------------------------------------
def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _tags(wheel_text: str) -> str:
    """The compressed tag set of a WHEEL file's Tag lines: cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64."""
    tags = [line.split(":", 1)[1].strip().split("-") for line in wheel_text.splitlines() if line.startswith("Tag:")]
    if not tags:
        return ""
    parts = [sorted({t[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def _source_tree() -> Path | None:
    """The source tree the running appliance is imported from (an editable install, or a checkout), if any."""
    import appliance

    root = Path(appliance.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "bundles").is_dir() else None


def _place(dist: metadata.Distribution, rel: str, site: Path, scripts: set[str], info_dir: str) -> str | None:
    """Where an installed file goes in the wheel (None: pip makes it again on install, or it is pip's own)."""
    if "__pycache__/" in rel and rel.endswith(".pyc"):
        return None
    if rel.startswith(info_dir + "/") and rel.split("/", 1)[1] in SKIP_INFO:
        return None
    if not rel.startswith("../"):
        return rel
    prefix = site.parents[2]  # PREFIX/lib/pythonX.Y/site-packages
    where = Path(os.path.normpath(site / rel))
    data = info_dir.removesuffix(".dist-info") + ".data"
    if where.is_relative_to(prefix / "bin"):
        name = where.relative_to(prefix / "bin").as_posix()
        return None if name in scripts else f"{data}/scripts/{name}"  # entry points are written by pip
    if where.is_relative_to(prefix / "include" / "site"):
        parts = where.relative_to(prefix / "include" / "site").parts  # pythonX.Y/DIST/...
        return f"{data}/headers/{'/'.join(parts[2:])}"
    if where.is_relative_to(prefix):
        return f"{data}/data/{where.relative_to(prefix).as_posix()}"
    raise WheelhouseError(f"{dist.metadata['Name']} installed {where} outside its environment",
                          "it cannot be carried as a wheel; build the wheelhouse from the index instead")


def pack(name: str, dest: str, level: int = 1) -> tuple[str, int]:
    """Write the installed distribution `name` to `dest` as a wheel; return (file name, size)."""
    return pack_dist(metadata.distribution(name), dest, level)


@bundle_errors()
def pack_dist(dist: metadata.Distribution, dest: str, level: int = 1) -> tuple[str, int]:
    wheel_text = dist.read_text("WHEEL")
    tag = _tags(wheel_text or "")
    if not tag:
        raise WheelhouseError(f"{dist.metadata['Name']} {dist.version} was not installed from a wheel, so it "
                              "cannot be packed",
                              "build the wheelhouse from the index instead (leave out --from-env)")
    site = Path(dist.locate_file("")).absolute()
    scripts = {ep.name for ep in dist.entry_points if ep.group in ("console_scripts", "gui_scripts")}
    dist_name = canonical(dist.metadata["Name"]).replace("-", "_")
    fname = f"{dist_name}-{dist.version}-{tag}.whl"
    record: list[tuple[str, str, str]] = []
    info_dir = next((str(f).split("/", 1)[0] for f in dist.files or [] if str(f).split("/", 1)[0].endswith(
        ".dist-info")), f"{dist_name}-{dist.version}.dist-info")
    info_files: list[tuple[str, Path, object]] = []
    kind = zipfile.ZIP_DEFLATED if level else zipfile.ZIP_STORED
    out = Path(dest) / fname
    # a random temp name created exclusively, no link followed (bundles.safefile)
    with atomic_create(out, 0o644) as fh, zipfile.ZipFile(fh, "w", kind, compresslevel=level or None) as zf:
        for f in dist.files or []:
            arc = _place(dist, str(f), site, scripts, info_dir)
            if arc is None:
                continue
            entry = (arc, Path(f.locate()), f.hash)
            if ".dist-info/" in arc and "/" not in arc.split(".dist-info/", 1)[1]:
                info_files.append(entry)  # the metadata goes last, as wheels have it
            else:
                record.append(_add(zf, *entry, dist, kind, level or None))
        for entry in info_files:
            record.append(_add(zf, *entry, dist, kind, level or None))
        rec_name = f"{info_dir}/RECORD"
        record.append((rec_name, "", ""))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(record)
        zi = zipfile.ZipInfo(rec_name, EPOCH)
        zi.external_attr = (stat.S_IFREG | 0o644) << 16
        zf.writestr(zi, buf.getvalue(), zipfile.ZIP_DEFLATED)
    return fname, out.stat().st_size


def _add(zf: zipfile.ZipFile, arc: str, src: Path, want, dist, kind: int, level: int | None
         ) -> tuple[str, str, str]:
    """Copy one installed file into the wheel, checking it against the hash pip recorded for it."""
    try:
        st = src.stat()
        fh = open(src, "rb")
    except OSError as e:
        raise WheelhouseError(f"{dist.metadata['Name']}: {src} is missing or unreadable ({e.strerror})",
                              f"reinstall it: pip install --force-reinstall {dist.metadata['Name']}=={dist.version}"
                              ) from None
    zi = zipfile.ZipInfo(arc, EPOCH)
    # the regular-file type bits too: pip restores an executable bit only when they are there
    zi.external_attr = (stat.S_IFREG | st.st_mode & 0o777 | 0o644) << 16
    zi.compress_type = kind
    if hasattr(zi, "compress_level"):  # Python 3.13+; before, zipfile read the level from the private name
        zi.compress_level = level
    else:
        zi._compresslevel = level
    seen, written = hashlib.sha256(), hashlib.sha256()
    size = 0
    top, _, rest = arc.partition("/")
    script = top.endswith(".data") and rest.startswith("scripts/")  # installed into bin/: pip fixes its #!
    with fh, zf.open(zi, "w", force_zip64=st.st_size > 1 << 30) as w:
        first = True
        while chunk := fh.read(CHUNK):
            seen.update(chunk)
            if first and script and chunk.startswith(b"#!") and b"python" in chunk.split(b"\n", 1)[0]:
                chunk = b"#!python" + chunk[chunk.index(b"\n"):] if b"\n" in chunk else b"#!python\n"
            first = False
            written.update(chunk)
            size += len(chunk)
            w.write(chunk)
    if want is not None and want.mode == "sha256" and want.value != _b64(seen.digest()):
        name = dist.metadata["Name"]
        raise WheelhouseError(f"{name}: {src} differs from what pip installed",
                              f"an installed file was changed; reinstall it: pip install --force-reinstall "
                              f"{name}=={dist.version}")
    return arc, f"sha256={_b64(written.digest())}", str(size)


def build_own_wheel(src: Path, dest: Path) -> str:
    """The appliance's own wheel from its source tree (an editable install), built without a network."""
    with tempfile.TemporaryDirectory(prefix="appliance-src-") as tmp:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for item in ("pyproject.toml", "README.md", "appliance", "bundles"):
            p = src / item
            if p.is_dir():
                shutil.copytree(p, Path(tmp) / item, ignore=ignore)
            elif p.is_file():
                shutil.copy2(p, Path(tmp) / item)
        before = set(os.listdir(dest))
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dest), tmp], isolated=True,
             what="building the appliance's own wheel")
    made = [n for n in set(os.listdir(dest)) - before if n.endswith(".whl")]
    if len(made) != 1:
        raise WheelhouseError("building the appliance's own wheel made no wheel", "see pip's output above")
    return made[0]


def _pip(args: list[str], isolated: bool, what: str, echo: bool = False) -> None:
    """Run pip, its output shown on stderr as it comes when `echo`; its last error line becomes ours.

    `isolated`: no pip configuration file and no PIP_* variable reaches it (nothing but what is named)."""
    env = dict(os.environ)
    if isolated:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", *(["--isolated"] if isolated else []), "--disable-pip-version-check", *args]
    tail: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout or []:
            if echo:
                sys.stderr.write(line)
            if line.strip():
                tail = [*tail[-40:], line.strip()]
    if p.returncode != 0:
        if not echo:
            sys.stderr.write("".join(f"  {ln}\n" for ln in tail[-15:]))
        why = next((ln for ln in reversed(tail) if ln.startswith("ERROR:")), tail[-1] if tail else "no output")
        raise WheelhouseError(f"{what} failed: {why.removeprefix('ERROR: ')}"[:600],
                              "pip's own words are above; fix what it names and build again")


# --- the wheelhouse ------------------------------------------------------------------------------------------
@bundle_errors()
def build(out: Path, torch: str | None = None, from_env: bool = False, find_links: list[Path] | None = None,
          no_index: bool = False, torch_index: str | None = None, sign_key: str | None = None,
          bundle: Path | None = None, force: bool = False, home=None, progress=None, compress_level: int = 1
          ) -> dict:
    """Write a wheelhouse to `out` (and, with `sign_key`, a signed bundle of kind installer to `bundle`)."""
    from appliance.home import atomic_dir

    out = Path(out).expanduser().absolute()
    if (sign_key is None) != (bundle is None):
        raise UsageError("--bundle and --sign-key go together", "pass both to also write a signed installer bundle")
    if torch is not None and torch not in BUILDS:
        raise UsageError(f"--torch {torch} is not a build", f"choose one of {', '.join(BUILDS)}")
    if from_env and (find_links or no_index or torch_index):
        raise UsageError("--from-env packs what is installed: --find-links, --no-index and --torch-index are for "
                         "downloading", "leave out --from-env, or those options")
    _check_target(out, force, is_dir=True)
    if bundle is not None:
        bundle = Path(bundle).expanduser().absolute()
        _check_target(bundle, force, is_dir=False)
    signer = None
    if sign_key:  # opened first: a wrong key passphrase fails before minutes of packing
        from appliance.exchange import secret_key

        signer = secret_key(home, sign_key)
    pins = closure()
    drift = _lock_mismatches(pins)
    if drift:
        raise WheelhouseError(f"this environment differs from requirements.lock: {', '.join(drift[:5])}",
                              "run `make setup` so the wheelhouse carries the pinned versions")
    have_version, have_build = torch_build(pins)
    want = torch or have_build
    if from_env and want != have_build:
        raise WheelhouseError(f"this environment has the {have_build} build of torch ({have_version}); it cannot "
                              f"pack a {want} one", "leave out --from-env to download it (on a connected machine)")
    pins.pop(canonical(ROOT))
    with atomic_dir(out) as tmp:
        wheels = tmp / "wheels"
        wheels.mkdir()
        src = _source_tree()
        own_file = build_own_wheel(src, wheels) if src else pack(ROOT, str(wheels), compress_level)[0]
        if from_env:
            _pack_all(pins, wheels, progress, compress_level)
        else:
            _download(wheels / own_file, pins, want, have_version, wheels, find_links or [], no_index,
                      torch_index)
        listing = _listing(wheels)
        version = listing[ROOT]["version"]  # the wheel just built, whatever stale metadata lies around
        torch_wheel = listing.get("torch")
        if torch_wheel is None or (want == "cpu") != ("+cpu" in torch_wheel["version"] or sys.platform == "darwin"):
            raise WheelhouseError(f"the wheelhouse did not get a {want} build of torch "
                                  f"(got {torch_wheel and torch_wheel['file']})", "pass --torch-index for that build")
        req = "".join(f"{w['name']}=={w['version']} \\\n    --hash=sha256:{w['sha256']}\n"
                      for w in listing.values())
        (tmp / "requirements.txt").write_text(req)
        release = f"{version}-{hashlib.sha256(req.encode()).hexdigest()[:12]}"
        manifest = {"format": FORMAT, "appliance": version, "release": release,
                    "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
                    "source": "environment" if from_env else "index",
                    "python": f"{sys.version_info.major}.{sys.version_info.minor}",
                    "implementation": sys.implementation.name, "platform": sysconfig.get_platform(),
                    "machine": platform.machine(), "torch": {"version": torch_wheel["version"], "build": want},
                    "wheels": list(listing.values())}
        (tmp / "wheelhouse.json").write_text(json.dumps(manifest, indent=2) + "\n")
        script = tmp / "install.sh"
        script.write_text(INSTALL_SH.format(version=version, release=release, python=manifest["python"],
                                            machine=manifest["machine"]))
        script.chmod(0o755)
        check_whole(wheels, listing)
        # signed before the directory takes its name: a failed bundle leaves no wheelhouse either
        signed = _bundle(tmp, bundle, manifest, signer, progress) if signer is not None else None
        for d in (tmp, wheels):
            d.chmod(0o755)  # made private as a temp directory; a wheelhouse is for whoever installs it
    return {"out": str(out), "release": release, "appliance": version, "source": manifest["source"],
            "python": manifest["python"], "machine": manifest["machine"], "torch": manifest["torch"],
            "wheels": len(listing), "bytes": sum(w["size"] for w in listing.values()), "bundle": signed}


def _check_target(path: Path, force: bool, is_dir: bool) -> None:
    """Refuse to overwrite anything but an earlier wheelhouse (or bundle), and that only with --force."""
    if not path.exists() and not path.is_symlink():
        return
    if is_dir and _empty_dir(path):
        return
    if is_dir and not (path.is_dir() and (path / "wheelhouse.json").is_file()):
        raise UsageError(f"{path} already exists and is not a wheelhouse", "pick a new directory for --out")
    if not is_dir and not path.is_file():
        raise UsageError(f"{path} already exists and is not a file", "pick a new path for --bundle")
    if not force:
        raise UsageError(f"{path} already exists", "pick a new path, or pass --force to replace it")


def _empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def _pack_all(pins: dict[str, Pin], wheels: Path, progress, level: int) -> None:
    """Pack every installed distribution, largest first, a thread per core (zlib and hashing release the GIL)."""
    sizes = {n: sum(f.size or 0 for f in p.dist.files or []) for n, p in pins.items()}
    start, advance = progress or NO_PROGRESS
    start(len(sizes), sum(sizes.values()))
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8))) as pool:
        futures = {pool.submit(pack_dist, pins[n].dist, str(wheels), level): n
                   for n in sorted(sizes, key=sizes.get, reverse=True)}
        for fut in as_completed(futures):
            fname, _size = fut.result()  # a packing error is raised here
            advance(sizes[futures[fut]], fname)


def _download(own_wheel: Path, pins: dict[str, Pin], build_: str, have_torch: str, wheels: Path,
              find_links: list[Path], no_index: bool, torch_index: str | None) -> None:
    """`pip download` of the same versions this environment runs (the torch build chosen), as wheels only."""
    base = have_torch.partition("+")[0]
    lines = [f"{p.name}=={p.version}" for n, p in pins.items() if n != "torch" and not n.startswith("nvidia-")]
    lines.append(f"torch=={base}+cpu" if build_ == "cpu" and sys.platform != "darwin"
                 else f"torch=={base},!={base}+cpu")
    cons = wheels.parent / "constraints.txt"
    cons.write_text("\n".join(lines) + "\n")
    args = ["download", "--dest", str(wheels), "--only-binary", ":all:", "-c", str(cons), str(own_wheel)]
    for d in [*find_links, *_wheel_caches()]:
        args += ["--find-links", str(d)]
    if no_index:
        args.append("--no-index")
    elif torch_index or build_ == "cpu":
        args += ["--extra-index-url", torch_index or CPU_INDEX]
    try:
        _pip(args, isolated=False, what="downloading the wheels", echo=True)
    finally:
        cons.unlink(missing_ok=True)


def _wheel_caches() -> list[Path]:
    """Where `make setup` keeps the llama.cpp wheel it built (published as source only)."""
    d = Path(os.environ.get("APPLIANCE_WHEELS") or Path.home() / ".cache" / "appliance" / "wheels")
    return [d] if d.is_dir() else []


def _listing(wheels: Path) -> dict[str, dict]:
    from packaging.utils import parse_wheel_filename

    listing = {}
    for f in sorted(wheels.iterdir()):
        if f.suffix != ".whl":
            raise WheelhouseError(f"{f.name} is not a wheel", "every distribution must be a wheel; build it first")
        name, version, _build, _tags = parse_wheel_filename(f.name)
        if name in listing:
            raise WheelhouseError(f"two wheels of {name}: {listing[name]['file']} and {f.name}",
                                  "build into an empty directory")
        listing[str(name)] = {"name": str(name), "version": str(version), "file": f.name,
                              "sha256": file_sha256(f), "size": f.stat().st_size}
    return dict(sorted(listing.items()))


def check_whole(wheels: Path, listing: dict[str, dict]) -> None:
    """The wheelhouse installs on its own here: every wheel fits this Python and platform, and every requirement
    reached from the appliance is met by a wheel in it (as pip's resolver would find, with nothing to fetch)."""
    from email.parser import HeaderParser

    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    requires: dict[str, list[str]] = {}
    for key, w in listing.items():
        if not parse_wheel_filename(w["file"])[3] & supported:
            raise WheelhouseError(f"{w['file']} does not install on this Python and platform",
                                  "build the wheelhouse with the Python and machine it is for")
        with zipfile.ZipFile(wheels / w["file"]) as z:
            name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            meta = HeaderParser().parsestr(z.read(name).decode("utf-8", "replace"))
        if (rp := meta.get("Requires-Python")) and not SpecifierSet(rp).contains(platform.python_version()):
            raise WheelhouseError(f"{w['file']} needs Python {rp}", "build with a Python it supports")
        requires[key] = meta.get_all("Requires-Dist") or []

    def missing(name: str, wanted_by: str) -> None:
        raise WheelhouseError(f"the wheelhouse lacks {name}" + (f", needed by {wanted_by}" if wanted_by else ""),
                              "build it again; pass --find-links where that wheel lies")

    walk(ROOT, requires.__getitem__, lambda k: listing[k]["version"] if k in listing else None, missing)


def _bundle(out: Path, dest: Path, manifest: dict, signer, progress) -> dict:
    """The wheelhouse as one signed bundle of kind installer, checked on the far side by `python -m bundles`."""
    from bundles import container

    files = [(f"wheels/{w['file']}", out / "wheels" / w["file"]) for w in manifest["wheels"]]
    files += [(n, out / n) for n in ("requirements.txt", "install.sh", "wheelhouse.json")]
    # the version orders releases for rollback memory: the build time, as YYYYMMDDHHMMSS
    version = int(re.sub(r"\D", "", manifest["created"])[:14])
    lineage = {k: manifest[k] for k in ("appliance", "release", "python", "machine", "platform", "torch")}
    total = sum(p.stat().st_size for _, p in files)
    start, advance = progress or NO_PROGRESS
    start(len(files), total)
    m = container.create(dest, "installer", ROOT, version, files, signer, lineage=lineage,
                         progress=lambda n: advance(n, dest.name))
    return {"file": str(dest), "kind": "installer", "version": version, "signer": m["signer"],
            "size": dest.stat().st_size}


INSTALL_SH = r"""#!/bin/sh
# Install appliance {version} from this wheelhouse with no network: pip reads this directory and nothing else.
#
#   sh install.sh [--prefix DIR] [--no-compile]        (default prefix: /opt/appliance)
#
# Each release gets its own virtual environment, DIR/releases/{release}. DIR/current is switched to it only
# once it is installed and starts, so a failed install or upgrade leaves the release in use as it was, and
# going back is pointing DIR/current at the previous release. Put DIR/current/bin on PATH.
# The vault is not touched here: the new release's first command migrates it, after an encrypted backup.
#
# What is checked, and when:
# - Who made this wheelhouse is checked BEFORE this script, by `python -m bundles unpack FILE --trust KEY`
#   (or `verify`), which verifies the signed installer bundle. This script checks no signature.
# - This script has pip check each wheel against the sha256 in requirements.txt beside it. That catches a
#   damaged copy, not a deliberate change: whoever can edit this directory can edit requirements.txt too.
#   Run it only from a directory that `python -m bundles unpack` just wrote, or that you built yourself.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
prefix=/opt/appliance
compile=--compile
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || {{ echo "install: --prefix needs a directory" >&2; exit 2; }}; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${{1#--prefix=}}; shift ;;
    --no-compile) compile=--no-compile; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
python=${{PYTHON:-python{python}}}
command -v "$python" >/dev/null 2>&1 || python=python3
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {{
  echo "install: no Python {python} found; set PYTHON=/path/to/python{python}" >&2; exit 1; }}
[ "$have" = "{python}" ] || {{
  echo "install: these wheels are for Python {python}, but $python is $have; set PYTHON=/path/to/python{python}" >&2
  exit 1; }}
[ "$(uname -m)" = "{machine}" ] || {{
  echo "install: these wheels are for {machine}, this machine is $(uname -m); build a wheelhouse on a $(uname -m)" >&2
  exit 1; }}
case "$prefix" in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
if [ -e "$prefix/current" ] && [ ! -L "$prefix/current" ]; then
  echo "install: $prefix/current is not a link to a release; move it away first" >&2; exit 1
fi
release=$prefix/releases/{release}
if [ -f "$release/.installed" ]; then
  echo "install: release {release} is already installed"
else
  mkdir -p "$prefix/releases"
  rm -rf "$release"
  failed() {{ trap - EXIT INT TERM HUP; rm -rf "$release"; echo "install: failed; nothing was switched" >&2; exit 1; }}
  trap failed EXIT INT TERM HUP
  echo "install: creating $release"
  "$python" -m venv "$release"
  PIP_CONFIG_FILE=/dev/null "$release/bin/python" -m pip --isolated --disable-pip-version-check install \
    --no-index --find-links "$here/wheels" --only-binary :all: --require-hashes $compile \
    -r "$here/requirements.txt"
  "$release/bin/appliance" --version >/dev/null
  touch "$release/.installed"
  trap - EXIT INT TERM HUP
fi
# a new link under a temp name, renamed over the old one: `current` is the old release or the new, never gone
ln -sfn "releases/{release}" "$prefix/.current.new"
"$release/bin/python" -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$prefix/.current.new" "$prefix/current"
echo "install: appliance {version} is $prefix/current; check the box with: $prefix/current/bin/appliance doctor"
"""
