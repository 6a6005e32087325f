"""Bundle throughput: export and verify against `sha256sum` of the same file, in the same run.

    python benchmarks/bundle_throughput.py [--gib 1] [--repeat 3] [--smoke] [--write docs/BENCHMARKS.md]

One file of random bytes (`--gib`), in the page cache for every side. Rows:
  - `sha256sum`: the baseline (one core, one pass);
  - SHA-256 on one core through hashlib (OpenSSL, the code bundles use), to separate the library's
    speed from the gain of hashing in parallel;
  - `bundle verify` of a plain bundle: the chunk tree hashed on all cores;
  - `bundle export` plain: a digest pass in parallel, then one copy pass that hashes again as it writes
    (a file changed mid-export is caught);
  - both again encrypted to one recipient (ChaCha20-Poly1305 stream; verify decrypts and hashes front
    to back).
Best of `--repeat`. --smoke: one pass over 16 MiB, a check that every row runs, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import update_section  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import cryptography

    from bundles import container
    from bundles.keys import SecretKey
    from bundles.trust import Trusted, TrustStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny size (16 MiB, one pass): checks that it runs")
    ap.add_argument("--write", type=Path, default=None, help="update this Markdown file's section")
    a = ap.parse_args()
    if a.smoke:
        a.gib, a.repeat = 1 / 64, 1
    key, edge = SecretKey.generate("bench"), SecretKey.generate("edge")
    trust = TrustStore([Trusted("bench", key.public, ("model",))])
    size = int(a.gib * (1 << 30))
    mb = size / 1e6
    with tempfile.TemporaryDirectory(prefix="bundle-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "weights.bin"
        with open(src, "wb") as f:
            for _ in range(size // (64 << 20)):
                f.write(os.urandom(64 << 20))
            f.write(os.urandom(size % (64 << 20)))
        plain, enc = Path(tmp) / "p.bundle", Path(tmp) / "e.bundle"

        def export(out: Path, recips):
            out.unlink(missing_ok=True)
            container.create(out, "model", "bench", 1, [("weights.bin", src)], key, None, recips)

        def one_core():
            import hashlib

            h = hashlib.sha256()
            with open(src, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)

        r = {"sha256sum": best(lambda: subprocess.run(["sha256sum", str(src)], check=True, capture_output=True),
                                a.repeat),
             "hashlib": best(one_core, a.repeat),
             "export": best(lambda: export(plain, None), a.repeat),
             "verify": best(lambda: container.verify(plain, trust), a.repeat),
             "export_enc": best(lambda: export(enc, [edge.public]), a.repeat),
             "verify_enc": best(lambda: container.verify(enc, trust, [edge]), a.repeat)}
    rate = {k: mb / v for k, v in r.items()}
    base = rate["sha256sum"]
    lines = [f"python {platform.python_version()}, cryptography {cryptography.__version__}, {os.cpu_count()} cores; "
             f"one {a.gib:g} GiB file in the page cache; best of {a.repeat}.", "",
             "| operation | MB/s | vs. `sha256sum` |", "| --- | ---: | ---: |"]
    for k, label in (("sha256sum", "`sha256sum` (baseline)"),
                     ("hashlib", "SHA-256 on one core, the library bundles use (OpenSSL via hashlib)"),
                     ("verify", "bundle verify (plain)"),
                     ("export", "bundle export (plain)"), ("verify_enc", "bundle verify (encrypted)"),
                     ("export_enc", "bundle export (encrypted)")):
        lines.append(f"| {label} | {rate[k]:,.0f} | {rate[k] / base:.2f}x |")
    lines += ["", f"**verify / sha256sum: {rate['verify'] / base:.2f}x** (aim: >= 1.5x); verify against the same "
                  f"SHA-256 code on one core: {rate['verify'] / rate['hashlib']:.2f}x (the gain from hashing chunks "
                  "on all cores)."]
    body = "\n".join(lines)
    print(body)
    if a.write:
        update_section(a.write, "bundle_throughput", "Bundle throughput (`benchmarks/bundle_throughput.py`)", body)


if __name__ == "__main__":
    main()
