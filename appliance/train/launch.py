"""Multi-process training: torchrun ranks fed by the launcher over a private Unix socket.

How the key reaches the workers: it doesn't. Only the launcher (the `appliance train run` process) unlocks
the vault; it packs the rows, keeps them in memory and serves them to the ranks over a Unix socket inside
the home's `tmp/` (mode 0700, socket 0600). Each rank proves itself with a random one-run ticket passed in
its environment; the ticket opens nothing but that socket, which vanishes when the run ends. Ranks send
their metrics and checkpoint notices back the same way and the launcher writes them to the vault. So no
worker ever holds the passphrase or the data key, 8 ranks read concurrently (one thread per connection,
rows served from memory), and nothing of the vault is written to disk in the clear.

Multi-node (documented in docs/TRAINING.md): each node runs the same `appliance train run ... --gpus 8
--nnodes N --node-rank I --rdzv-endpoint HOST:PORT` against its own copy of the vault; the data order is a
function of the seed, so every node's launcher serves the same rows.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.train.model import TrainError
from appliance.train.spec import StageSpec

if TYPE_CHECKING:
    from appliance.memfiles import MemFile
    from appliance.sealed import GivenKeys

ENV_SOCKET, ENV_TICKET = "APPLIANCE_TRAIN_SOCKET", "APPLIANCE_TRAIN_TICKET"
MAX_HEADER = 1 << 24
MAX_FDS = 200  # descriptors passed in one message (the kernel takes at most 253)


@dataclass
class Nodes:
    """torchrun's own rendezvous flags, passed through for multi-node runs."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""


def rendezvous_id(spec: StageSpec, nodes: Nodes) -> str:
    """torchrun's rendezvous id for a multi-node run: the same on every node of one run, different for every run.

    Made of what every node of one run shares and another run does not: the run's id (NAME@K, a new K for each
    run of a recipe; a resumed run keeps its own), the resolved recipe, the node count and node 0's endpoint.
    Nodes whose vaults disagree on NAME@K (not restored from the same backup) do not meet, and say so by timing
    out rather than joining another run.
    """
    import hashlib

    what = {"run": spec.run_id, "recipe": spec.recipe.to_dict(), "nnodes": nodes.nnodes,
            "endpoint": nodes.rdzv_endpoint}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{spec.recipe.name}-{digest}"


# --- wire format: 4-byte length + JSON header, then `nbytes` of raw payload ------------------------------
def send(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps({**header, "nbytes": len(payload)}).encode()
    sock.sendall(struct.pack("!I", len(head)) + head + payload)


def recv(sock: socket.socket) -> tuple[dict, bytes]:
    (n,) = struct.unpack("!I", _exact(sock, 4))
    if n > MAX_HEADER:
        raise ConnectionError("oversized message")
    header = json.loads(_exact(sock, n))
    return header, _exact(sock, header.get("nbytes", 0))


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 22))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


# --- the launcher's side --------------------------------------------------------------------------------
class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handing = True  # the files handed to ranks are still open: `stop_handing` ends that before they close
        self.sending = threading.Lock()  # held while a handler sends them

    def stop_handing(self) -> None:
        """No handler sends a descriptor once this returns (one sending finishes first): the caller may close the
        handed files, whose numbers could otherwise name other files by the time a late handler sent them."""
        with self.sending:
            self.handing = False


def serve(path: Path, ticket: str, spec: StageSpec, rows: Callable, on_step: Callable, on_checkpoint: Callable,
          results: dict, stop: threading.Event | None = None,
          keys: GivenKeys | dict[str, bytes] | None = None,
          files: dict[str, dict[str, MemFile]] | None = None) -> _Server:
    """The launcher's side. A rank that proves itself gets the spec, the keys of the sealed artifacts the run
    writes (its run key among them; `run.run_keys`, a `sealed.GivenKeys`) and which of them are written with
    manifests, and the artifacts it only reads as frozen in-memory files (`run.run_files`), passed as descriptors
    over the socket; never their keys, nor the vault's."""
    import base64

    from appliance import sealed

    given = keys if isinstance(keys, sealed.GivenKeys) else sealed.GivenKeys(dict(keys or {}))
    handed = {a: base64.b64encode(k).decode() for a, k in given.keys.items()}
    manifested = sorted(given.with_manifests)
    listed = {a: sorted(f) for a, f in (files or {}).items()}
    fds = [files[a][n].fd for a, names in listed.items() for n in names]
    lock = threading.Lock()  # the vault connection is shared: one writer at a time

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock = self.request
            try:
                header, _ = recv(sock)
                if header.get("op") != "hello" or not secrets.compare_digest(str(header.get("ticket", "")), ticket):
                    send(sock, {"ok": False, "error": "bad ticket"})
                    return
                send(sock, {"ok": True, "spec": spec.to_dict(), "keys": handed, "manifested": manifested,
                            "files": listed})
                with server.sending:
                    if fds and not server.handing:
                        return  # the run is over: its files are being closed
                    for at in range(0, len(fds), MAX_FDS):
                        group = fds[at:at + MAX_FDS]
                        socket.send_fds(sock, [struct.pack("!I", len(group))], group)
                while True:
                    header, payload = recv(sock)
                    op = header["op"]
                    if op == "rows":
                        t, lab = rows(np.frombuffer(payload, np.int64))
                        send(sock, {"shape": list(t.shape)}, t.tobytes() + lab.tobytes())
                        continue
                    verdict = None
                    with lock:
                        if op == "step":
                            verdict = on_step(header["metrics"])
                        elif op == "checkpoint":
                            on_checkpoint(header["step"], header["path"])
                        elif op == "result":
                            results[header["rank"]] = header["result"]
                    # a stop request (Ctrl-C at the launcher) rides on the reply to rank 0's step report
                    send(sock, {"ok": True, "stop": bool(stop and stop.is_set()), "finish": verdict == "finish"})
            except (ConnectionError, OSError, json.JSONDecodeError, KeyError):
                return

    server = _Server(str(path), Handler)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, daemon=True, name="train-data").start()
    return server


def run_distributed(tmp_dir: Path, spec: StageSpec, rows: Callable, on_step: Callable, on_checkpoint: Callable,
                    nproc: int, nodes: Nodes, threads: int | None = None,
                    keys: GivenKeys | dict[str, bytes] | None = None,
                    files: dict[str, dict[str, MemFile]] | None = None) -> dict:
    """Run the stage on `nproc` local ranks (x nnodes) under torchrun; returns rank 0's result."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"train-{secrets.token_hex(6)}.sock"
    short_dir = None
    if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to ~107 bytes: a deep home gets a private
        short_dir = Path(tempfile.mkdtemp(prefix="appliance-"))  # 0700 directory in the system's temp dir
        path = short_dir / "train.sock"
        if len(os.fsencode(path)) > 100:
            short_dir.rmdir()
            raise TrainError(f"no short enough place for the workers' socket ({path})",
                             "use a --home (or TMPDIR) with a shorter path")
    ticket = secrets.token_hex(32)
    results: dict = {}
    stop = threading.Event()
    try:
        server = serve(path, ticket, spec, rows, on_step, on_checkpoint, results, stop, keys, files)
    except OSError:
        if short_dir is not None:
            short_dir.rmdir()
        raise
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nodes.nnodes > 1:
        cmd += [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={nodes.rdzv_endpoint}", f"--rdzv-id={rendezvous_id(spec, nodes)}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "appliance.train.worker"]
    env = {**os.environ, ENV_SOCKET: str(path), ENV_TICKET: ticket}
    for k in ("APPLIANCE_PASSPHRASE", "APPLIANCE_PASSPHRASE_FILE", "APPLIANCE_NEW_PASSPHRASE",
              "APPLIANCE_NEW_PASSPHRASE_FILE"):
        env.pop(k, None)  # workers never need it
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc: subprocess.Popen | None = None

    def on_sigint(signum, frame):
        # torchrun runs in a session of its own, so a terminal Ctrl-C reaches only this process (torchrun
        # would otherwise kill slow ranks mid-checkpoint after 30 s). Ask rank 0 to stop at the next step;
        # a second Ctrl-C terminates the ranks, which still stop at a checkpoint on SIGTERM.
        if stop.is_set() and proc is not None:
            proc.terminate()
        stop.set()

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        # Not communicate(): the kernel may hand SIGINT to any thread (the socket server's, the recorder's),
        # and Python runs the handler only when the main thread next runs; blocked in a read, that would be
        # when the ranks are done. Waiting in short slices lets a Ctrl-C act within a fraction of a second.
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        reader.join()
        stderr = "".join(chunks)
    finally:
        signal.signal(signal.SIGINT, old)
        server.shutdown()
        server.stop_handing()
        server.server_close()
        path.unlink(missing_ok=True)
        if short_dir is not None:
            short_dir.rmdir()
    failed = [r for _, r in sorted(results.items()) if r.get("status") == "failed"]
    if failed:
        return failed[0]
    if results:  # rank 0 on the first node; this node's first rank elsewhere
        return results[min(results)]
    if stop.is_set():
        return {"status": "interrupted", "step": None}
    raise TrainError(f"the training processes failed (exit {proc.returncode}): {_last_error(stderr)}",
                     "see the message above; resume with --resume once fixed")


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def _last_error(stderr: str) -> str:
    """The ranks' own last error in torchrun's stderr.

    torchrun ends a failed run with a report of its own (a traceback ending in `ChildFailedError:`, then
    exit codes), which says nothing of the cause: the rank's exception line before it is what to show, else
    torchrun's line naming the rank that failed and how (a signal leaves no traceback).
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXCEPTION.match(ln) and "ChildFailedError" not in ln:
            return ln[:300]
    for ln in reversed(lines):
        if "failed (exitcode" in ln:
            return ln[ln.index("failed (exitcode"):][:300]
    for ln in reversed(lines):
        if ("Error" in ln or "error:" in ln) and "ChildFailedError" not in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# --- a rank's side --------------------------------------------------------------------------------------
def receive_files(sock: socket.socket, listed: dict[str, list[str]]) -> dict[str, dict[str, MemFile]]:
    """The in-memory files the launcher sends after its hello, as descriptors, in the order `listed` names them;
    each must be a frozen in-memory file (`MemFile.adopt`)."""
    from appliance.memfiles import MemFile

    names = [(a, n) for a, ns in listed.items() for n in ns]
    got: list[MemFile] = []
    try:
        while len(got) < len(names):
            msg, fds, flags, _ = socket.recv_fds(sock, 4, MAX_FDS, socket.MSG_CMSG_CLOEXEC)  # close-on-exec at once
            for i, fd in enumerate(fds):
                try:
                    got.append(MemFile.adopt(fd))  # a frozen in-memory file, or closed and refused
                except BaseException:
                    for rest in fds[i + 1:]:
                        os.close(rest)
                    raise
            if len(msg) != 4 or flags & socket.MSG_CTRUNC or struct.unpack("!I", msg)[0] != len(fds) or not fds:
                raise ConnectionError("the launcher's files did not arrive whole")
    except BaseException:
        for f in got:
            f.close()
        raise
    out: dict[str, dict[str, MemFile]] = {}
    for (a, n), f in zip(names, got):
        out.setdefault(a, {})[n] = f
    return out


class SocketLink:
    """What a rank sees of the launcher: rows by index, and places to report steps and checkpoints."""

    def __init__(self, path: str, ticket: str):
        import threading

        self.lock = threading.Lock()  # rows are fetched on the prefetch thread while the main one reports steps
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        send(self.sock, {"op": "hello", "ticket": ticket})
        header, _ = recv(self.sock)
        if not header.get("ok"):
            raise TrainError("the launcher refused this worker", header.get("error"))
        self.spec = StageSpec.from_dict(header["spec"])
        import base64

        from appliance import sealed

        artifacts = self.spec.run_dir.parent.parent  # HOME/artifacts/runs/ID
        sealed.register(sealed.Store(artifacts, artifacts.parent / "tmp", sealed.GivenKeys(
            {a: base64.b64decode(k) for a, k in header.get("keys", {}).items()},
            set(header.get("manifested", []))), receive_files(self.sock, header.get("files", {}))))

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            send(self.sock, {"op": "rows"}, np.asarray(index, np.int64).tobytes())
            header, payload = recv(self.sock)
        n, L = header["shape"]
        half = n * L * 4
        return (np.frombuffer(payload[:half], np.int32).reshape(n, L),
                np.frombuffer(payload[half:], np.int32).reshape(n, L))

    def _call(self, header: dict) -> dict:
        with self.lock:
            send(self.sock, header)
            return recv(self.sock)[0]

    def step(self, metrics: dict) -> bool | str:
        """Report a step; True when the launcher asks the run to stop, "finish" to end it early as done."""
        header = self._call({"op": "step", "metrics": metrics})
        return "finish" if header.get("finish") else bool(header.get("stop"))

    def checkpoint(self, step: int, path: str) -> None:
        self._call({"op": "checkpoint", "step": step, "path": path})

    def result(self, rank: int, result: dict) -> None:
        self._call({"op": "result", "rank": rank, "result": result})

    def close(self) -> None:
        self.sock.close()
