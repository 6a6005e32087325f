"""Serving records, sealed: scrub what was served and write it into the vault in batches.

Text is scrubbed as it is taken (the raw request never sits in the buffer), kept in memory only, and written
when `flush_records` are waiting, every `flush_seconds`, and at shutdown. The vault is attached only for the
length of a write (`Vault.session`), so other processes use it freely between writes. Nothing goes to a
file: a batch that cannot be written is kept for the next try, and what is left at shutdown is reported
by count only.
"""

from __future__ import annotations

import json
import random
import threading
from collections import OrderedDict
from collections.abc import Callable

from appliance import logs
from appliance.db_time import utcnow
from appliance.serving import store

MAX_BUFFER = 50_000  # records held while the vault is busy; past it the oldest are dropped (counted)
KNOWN_IDS = 200_000  # ids of recorded responses this server remembers, for feedback before a write


class Recorder:
    """Scrubs and buffers what one server serves, and writes it with `write(records, feedback)`.

    Args:
        deployment: the deployment's name.
        scrub: text -> (scrubbed text, counts per PII type).
        write: writes a batch into the vault (attaching only meanwhile); raises when it cannot.
        sample_rate: the share of requests recorded.
        flush_records, flush_seconds: when a batch is written.
        exists: whether a response id is in the vault (feedback on a response of an earlier run).
    """

    def __init__(self, deployment: str, scrub: Callable[[str], tuple[str, dict]],
                 write: Callable[[list, list], dict], sample_rate: float = 1.0, flush_records: int = 64,
                 flush_seconds: float = 5.0, exists: Callable[[str], bool] = lambda rid: False):
        self.deployment, self._scrub, self._write = deployment, scrub, write
        self.sample_rate, self.flush_records, self.flush_seconds = sample_rate, flush_records, flush_seconds
        self._exists = exists
        self._records: list[store.Served] = []
        self._feedback: list[store.Feedback] = []
        self._known: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.written = {"records": 0, "feedback": 0, "expired": 0, "dropped": 0, "failed_writes": 0}

    # --- what the server hands over --------------------------------------------------------------------
    def sampled(self) -> bool:
        return self.sample_rate >= 1.0 or self._rng.random() < self.sample_rate

    def add(self, rid: str, arm: str, model: str, messages: list[dict], answer: str, usage: dict,
            latency_ms: float, status: str, finish_reason: str | None, reference: dict | None = None) -> None:
        """One response. `messages` are the request's (a completion's prompt is one message of role `prompt`);
        `reference` ({"reference", "expect"}, from the request's metadata) is kept, scrubbed, on the last
        user or prompt message, where `eval ab` scores the answer against it."""
        counts: dict[str, int] = {}

        def scrub(text: str) -> str:
            out, found = self._scrub(text)
            for k, n in found.items():
                counts[k] = counts.get(k, 0) + n
            return out

        clean = [{"role": str(m.get("role", "")), "content": scrub(_content(m.get("content")))} for m in messages]
        asked = [m for m in clean if m["role"] in store.ASKED]
        if reference and asked:
            asked[-1].update(reference=scrub(reference["reference"]), expect=reference.get("expect", "contains"))
        user = sum(len(_content(m.get("content"))) for m in messages if m.get("role") in store.ASKED)
        rec = store.Served(rid, self.deployment, arm, model, utcnow(), json.dumps(clean), scrub(answer or ""), user,
                           usage.get("prompt_tokens"), usage.get("completion_tokens"), latency_ms, status,
                           finish_reason, counts)
        with self._lock:
            self._records.append(rec)
            if len(self._records) > MAX_BUFFER:
                del self._records[0]
                self.written["dropped"] += 1
            self._known[rid] = None
            if len(self._known) > KNOWN_IDS:
                self._known.popitem(last=False)
            if len(self._records) >= self.flush_records:
                self._wake.set()

    def feedback(self, rid: str, rating: int | None, correction: str | None) -> bool:
        """Feedback on a recorded response; False when this deployment recorded no such response."""
        with self._lock:
            known = rid in self._known
        if not known and not self._exists(rid):
            return False
        text = self._scrub(correction)[0] if correction else None
        with self._lock:
            self._feedback.append(store.Feedback(rid, utcnow(), rating, text, "serve"))
            if len(self._feedback) >= self.flush_records:
                self._wake.set()
        return True

    # --- writing ---------------------------------------------------------------------------------------
    def flush(self) -> dict:
        with self._lock:
            records, feedback = self._records, self._feedback
            self._records, self._feedback = [], []
        if not records and not feedback:
            return {"records": 0, "feedback": 0, "expired": 0}
        try:
            done = self._write(records, feedback)
        except Exception as e:  # noqa: BLE001 - the vault busy or failing: keep the batch for the next try
            with self._lock:
                self._records[:0], self._feedback[:0] = records, feedback
            self.written["failed_writes"] += 1
            logs.event("serve.record.retry", error=type(e).__name__, waiting=len(records) + len(feedback))
            raise
        for k in ("records", "feedback", "expired"):
            self.written[k] += done.get(k, 0)
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="serving-recorder", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001, S112 - logged by flush; tried again at the next tick
                continue

    def close(self) -> dict:
        """Stop the flushing thread and write what is left; returns the totals written."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - counted below; the text is not put anywhere else
            with self._lock:
                self.written["dropped"] += len(self._records)
                self._records, self._feedback = [], []
        return dict(self.written)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._records) + len(self._feedback)


def _content(content) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
