"""The data path: vault records -> token ids -> fixed-length packed rows, cached only inside the vault.

Text (pretrain, continue): documents are tokenized and concatenated with EOS between them, then cut into
rows of `seq_len`; only the final row is padded. Documents packed into a row are kept apart by position
ids that restart per document (`document_positions`). Chat (sft): each prompt/response pair is rendered with the
tokenizer's chat template; only the assistant's tokens are scored (label -100 elsewhere); pairs are packed
whole, first come first served, into rows. Preference (dpo): each prompt/chosen/rejected triple is one row
of 2 x `seq_len`: the chosen conversation, padded, then the rejected one, each scored on the answer only.

Packed rows live in memory and in the encrypted vault (`token_cache`), never in a plaintext file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from appliance.db_time import utcnow
from appliance.errors import UsageError
from appliance.train.config import DataConfig

IGNORE = -100
CACHE_ROWS = 1024  # rows per cached part (a BLOB each)
@dataclass
class Packed:
    """Rows of token ids; labels are the ids to score (-100: not scored)."""

    tokens: np.ndarray  # (N, L) int32
    labels: np.ndarray  # (N, L) int32
    stats: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[index], self.labels[index]


def pinned(con, refs: list[str]) -> list[tuple[str, str]]:
    """Each dataset ref as (NAME@N, content hash): runs record exactly which versions they read."""
    from appliance.vault.versions import resolve

    out = []
    for ref in refs:
        vid, name, n = resolve(con, ref)
        (h,) = con.execute("SELECT content_hash FROM versions WHERE vid = ?", [vid]).fetchone()
        out.append((f"{name}@{n}", h))
    return out


def cache_key(cfg: DataConfig, datasets: list[tuple[str, str]], tokenizer_hash: str) -> str:
    spec = {"format": cfg.format, "seq_len": cfg.seq_len, "datasets": [h for _, h in datasets],
            "tokenizer": tokenizer_hash, "packing": 2}
    if cfg.format == "text":  # table rows used to be packed with their "[table row N]" header
        spec.update(tables=cfg.tables)
    if cfg.format == "chat":
        spec.update(prompt=cfg.prompt_field, response=cfg.response_field, system=cfg.system_prompt)
    if cfg.format == "preference":
        spec.update(prompt=cfg.prompt_field, chosen=cfg.chosen_field, rejected=cfg.rejected_field,
                    system=cfg.system_prompt)
    if cfg.format == "prompts":
        spec.update(prompt=cfg.prompt_field, response=cfg.response_field, system=cfg.system_prompt)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def prepare(vault, cfg: DataConfig, tokenizer, tokenizer_hash: str,
            progress: Callable[[str], None] = lambda s: None) -> tuple[Packed, list[tuple[str, str]], bool]:
    """Packed rows for `cfg`, from the vault cache when the same data and tokenizer were packed before."""
    if cfg.format == "task":  # the prompts are the task's episodes, not vault data: packed in memory
        packed = pack_task(tokenizer, cfg, "train")
        if packed.rows == 0:
            raise UsageError(f"every train episode of task {cfg.task} has a first prompt longer than data.seq_len "
                             f"({cfg.seq_len} tokens)", "raise data.seq_len")
        return packed, [], False
    datasets = pinned(vault.con, cfg.datasets)
    key = cache_key(cfg, datasets, tokenizer_hash)
    cached = load_cached(vault.con, key)
    if cached is not None:
        return cached, datasets, True
    progress(f"tokenizing {', '.join(d for d, _ in datasets)}")
    packed = _pack(vault.con, cfg, tokenizer, [d for d, _ in datasets], "train")
    if packed.rows == 0:
        raise UsageError(f"{', '.join(cfg.datasets)} gave no training rows", "ingest more data")
    with vault.transaction():
        store_cached(vault.con, key, packed, with_labels=cfg.format != "text")
    return packed, datasets, False


def _pack(con, cfg: DataConfig, tokenizer, refs: list[str], split: str) -> Packed:
    if cfg.format == "chat":
        return pack_chat(tokenizer, chat_pairs(con, refs, cfg, split), cfg.seq_len, cfg.system_prompt)
    if cfg.format == "preference":
        return pack_preference(tokenizer, preference_triples(con, refs, cfg, split), cfg.seq_len, cfg.system_prompt)
    if cfg.format == "prompts":
        columns = [(cfg.prompt_field, "data.prompt_field")]
        if cfg.response_field:
            columns.append((cfg.response_field, "data.response_field"))
        rows = table_rows(con, refs, columns, split, "ingest a JSONL/CSV with a prompt column as the GRPO dataset")
        return pack_prompts(tokenizer, rows, cfg.seq_len, cfg.system_prompt)
    seen = {"table_rows": 0}
    packed = pack_text(tokenizer, _texts(con, refs, split, cfg.tables, seen), cfg.seq_len)
    packed.stats.update(tables=cfg.tables, table_rows=seen["table_rows"])
    return packed


def validation(vault, cfg: DataConfig, tokenizer, datasets: list[tuple[str, str]], tokenizer_hash: str) -> Packed:
    """Packed rows of the datasets' validation split (the loss a run is judged by); cached like the train rows."""
    if cfg.format == "task":
        packed = pack_task(tokenizer, cfg, "validation")
        if packed.rows == 0:
            raise UsageError(f"task {cfg.task} has no validation episodes that fit data.seq_len ({cfg.seq_len} tokens)",
                             "mark some episodes split = \"validation\" (or raise data.seq_len), or set "
                             "train.eval_every = 0")
        return packed
    key = "validation:" + cache_key(cfg, datasets, tokenizer_hash)
    if (cached := load_cached(vault.con, key)) is not None:
        return cached
    refs = [d for d, _ in datasets]
    packed = _pack(vault.con, cfg, tokenizer, refs, "validation")
    if packed.rows == 0:
        raise UsageError(f"{', '.join(refs)} have no validation split to measure", "ingest with --validation 0.05 "
                         "(the default) or more, or set train.eval_every = 0")
    with vault.transaction():
        store_cached(vault.con, key, packed, with_labels=cfg.format != "text")
    return packed


def _texts(con, refs: list[str], split: str = "train", tables: str = "text",
           seen: dict | None = None) -> Iterator[str]:
    """Documents to pre-train on. A table row's record starts with a "[table row N]" header, which a model
    would learn to write; it is dropped ("text") or the row left out ("skip"). `seen` counts table rows."""
    from appliance.vault.versions import iter_records

    for ref in refs:
        for rec in iter_records(con, ref, split=split):
            if rec["kind"] != "table":
                yield rec["text"]
                continue
            if seen is not None:
                seen["table_rows"] += 1
            if tables == "text":
                yield row_prose(rec["text"])


def row_prose(text: str) -> str:
    """A table row's record without its "[table row N]" header line: "column: value" lines only."""
    head, _, rest = text.partition("\n")
    return rest if _ROW_HEADER.fullmatch(head) else text


_ROW_HEADER = re.compile(r"\[.* row \d+\]")


def pack_text(tokenizer, texts: Iterable[str], seq_len: int, batch: int = 512) -> Packed:
    """Documents joined by EOS, cut into rows of seq_len; the final partial row is padded and not scored."""
    eos = tokenizer.eos_token_id
    pad = _pad_id(tokenizer)
    pieces: list[np.ndarray] = []
    docs = 0
    for chunk in _batched(texts, batch):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=np.int32))
            docs += 1
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n_tokens = len(stream)
    rows = -(-n_tokens // seq_len)
    pad_count = rows * seq_len - n_tokens
    tokens = np.concatenate([stream, np.full(pad_count, pad, np.int32)]).reshape(rows, seq_len)
    labels = tokens.copy()
    if pad_count:
        labels[-1, seq_len - pad_count:] = IGNORE
    return Packed(tokens, labels, _stats(docs, tokens, labels, pad_count, truncated=0))


def chat_pairs(con, refs: list[str], cfg: DataConfig, split: str = "train") -> Iterator[tuple[str, str]]:
    """(prompt, response) of every row of the tables in `refs` in `split`."""
    return table_rows(con, refs, [(cfg.prompt_field, "data.prompt_field"), (cfg.response_field, "data.response_field")],
                      split, "ingest a JSONL/CSV of prompt/response pairs as the SFT dataset")


def preference_triples(con, refs: list[str], cfg: DataConfig, split: str = "train") -> Iterator[tuple[str, ...]]:
    """(prompt, chosen, rejected) of every row of the tables in `refs` in `split`."""
    return table_rows(con, refs, [(cfg.prompt_field, "data.prompt_field"), (cfg.chosen_field, "data.chosen_field"),
                                  (cfg.rejected_field, "data.rejected_field")],
                      split, "ingest a JSONL/CSV of prompt/chosen/rejected rows as the DPO dataset")


def table_rows(con, refs: list[str], columns: list[tuple[str, str]], split: str, hint: str
               ) -> Iterator[tuple[str, ...]]:
    """The given columns (each with the recipe key that names it) of every table row of `refs` in `split`;
    rows with an empty value are skipped."""
    from appliance.vault.versions import resolve

    for ref in refs:
        vid, _, _ = resolve(con, ref)
        wanted: dict[str, list[int]] = {}
        for table, meta in con.execute(
                "SELECT path, meta FROM version_records WHERE vid = ? AND split = ? AND kind = 'table' "
                "ORDER BY ord", [vid, split]).fetchall():
            wanted.setdefault(table, []).append(json.loads(meta)["row"])
        if not wanted and split != "train":
            continue
        if not wanted:
            raise UsageError(f"{ref} has no table rows to train on", hint)
        for table, rows in wanted.items():
            cols = [c for (c,) in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'data' AND table_name = ?",
                [table]).fetchall()]
            for f, key in columns:
                if f not in cols:
                    raise UsageError(f"{ref} table has no column {f!r} ({key})",
                                     f"its columns are {', '.join(cols)}; set --{key} NAME")
            picked = ", ".join(f'"{f}"' for f, _ in columns)
            query = f'SELECT rowid, {picked} FROM data."{table}"'
            got = {rid + 1: vals for rid, *vals in con.execute(query).fetchall()}
            for row in rows:
                vals = got.get(row)
                if vals and all(vals):
                    yield tuple(str(x) for x in vals)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation split into (text, scored) pieces; only assistant content is scored.

    Works for any chat template whose rendering of a prefix of the turns is a prefix of the whole.
    """
    def render(msgs, gen=False):
        if not msgs and not gen:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        full = render(messages[: i + 1])
        if m["role"] == "assistant":
            head = render(messages[:i], gen=True)
            if not (head.startswith(done) and full.startswith(head)):
                raise UsageError("the base model's chat template does not render turns as prefixes",
                                 "use a ChatML-style template")
            out += [(head[len(done):], False), (full[len(head):], True)]
        else:
            if not full.startswith(done):
                raise UsageError("the base model's chat template does not render turns as prefixes",
                                 "use a ChatML-style template")
            out.append((full[len(done):], False))
        done = full
    return [(t, s) for t, s in out if t]


def conversation(system_prompt: str, prompt: str, answer: str | None = None) -> list[dict]:
    """The messages of one training conversation: optional system turn, the user's turn, the answer."""
    return (([{"role": "system", "content": system_prompt}] if system_prompt else [])
            + [{"role": "user", "content": prompt}]
            + ([{"role": "assistant", "content": answer}] if answer is not None else []))


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, scored in chat_segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if scored else [IGNORE] * len(piece)
    return ids, labels


def pack_chat(tokenizer, pairs: Iterable[tuple[str, str]], seq_len: int, system_prompt: str = "",
              window: int = 64) -> Packed:
    """Each pair whole in one row (truncated if longer than a row), first-fit into the last `window` open rows.

    First-fit keeps padding low for short pairs; the window bounds the search so packing stays linear.
    """
    pad = _pad_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    open_rows: list[int] = []  # indices of rows with room left
    docs = truncated = 0
    for prompt, response in pairs:
        ids, labels = encode_chat(tokenizer, conversation(system_prompt, prompt, response))
        docs += 1
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        target = next((i for i in open_rows if len(rows[i][0]) + len(ids) <= seq_len), None)
        if target is None:
            rows.append(([], []))
            target = len(rows) - 1
            open_rows.append(target)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[target][0].extend(ids)
        rows[target][1].extend(labels)
        if len(rows[target][0]) == seq_len:
            open_rows.remove(target)
    tokens = np.full((len(rows), seq_len), pad, np.int32)
    labels_arr = np.full((len(rows), seq_len), IGNORE, np.int32)
    for i, (t, lab) in enumerate(rows):
        tokens[i, :len(t)] = t
        labels_arr[i, :len(lab)] = lab
    pad_count = len(rows) * seq_len - sum(len(t) for t, _ in rows)
    return Packed(tokens, labels_arr, _stats(docs, tokens, labels_arr, pad_count, truncated))


def pack_preference(tokenizer, triples: Iterable[tuple[str, str, str]], seq_len: int, system_prompt: str = ""
                    ) -> Packed:
    """One row of 2 x seq_len per triple: [chosen conversation | rejected conversation], each padded on its
    own and scored on the answer only. A triple whose prompt leaves no answer token within seq_len is
    dropped (it would teach nothing) and counted."""
    pad = _pad_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    docs = truncated = dropped = used = 0
    for prompt, chosen, rejected in triples:
        docs += 1
        halves = []
        for answer in (chosen, rejected):
            ids, labels = encode_chat(tokenizer, conversation(system_prompt, prompt, answer))
            truncated += len(ids) > seq_len
            halves.append((ids[:seq_len], labels[:seq_len]))
        if any(all(x == IGNORE for x in lab[1:]) for _, lab in halves):  # position 0 is never predicted
            dropped += 1
            continue
        used += sum(len(ids) for ids, _ in halves)
        rows.append(tuple(halves))  # type: ignore[arg-type]
    tokens = np.full((len(rows), 2 * seq_len), pad, np.int32)
    labels_arr = np.full((len(rows), 2 * seq_len), IGNORE, np.int32)
    for i, halves in enumerate(rows):
        for h, (ids, lab) in enumerate(halves):
            tokens[i, h * seq_len:h * seq_len + len(ids)] = ids
            labels_arr[i, h * seq_len:h * seq_len + len(lab)] = lab
    stats = _stats(docs, tokens, labels_arr, tokens.size - used, truncated)
    return Packed(tokens, labels_arr, {**stats, "pairs": len(rows), "dropped": dropped})


def pack_task(tokenizer, cfg: DataConfig, split: str) -> Packed:
    """GRPO rows of a task's episodes: the first turn's prompt, and the episode's number as the "answer"
    (the reward plays the rest of the episode from it)."""
    from appliance.tasks import goal_of, load, prompt_for

    task = load(cfg.task)
    return pack_prompts(tokenizer, ((prompt_for(task, goal_of(task, i), []), str(i)) for i in task.indexes(split)),
                        cfg.seq_len, cfg.system_prompt)


def pack_prompts(tokenizer, rows: Iterable[tuple[str, ...]], seq_len: int, system_prompt: str = "") -> Packed:
    """One row of 2 x seq_len per prompt for GRPO. The labels carry the data: the prompt rendered up to the
    assistant's turn in the first half, the reference answer (if any) in the second. A prompt longer than
    seq_len is dropped and counted; an answer is cut to seq_len."""
    pad = _pad_id(tokenizer)
    kept: list[tuple[list[int], list[int]]] = []
    docs = truncated = dropped = 0
    for row in rows:
        docs += 1
        text = tokenizer.apply_chat_template(conversation(system_prompt, row[0]), tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(row[1], add_special_tokens=False)["input_ids"] if len(row) > 1 else []
        if len(prompt) > seq_len:
            dropped += 1
            continue
        truncated += len(answer) > seq_len
        kept.append((prompt, answer[:seq_len]))
    tokens = np.full((len(kept), 2 * seq_len), pad, np.int32)
    labels = np.full((len(kept), 2 * seq_len), IGNORE, np.int32)
    for i, (prompt, answer) in enumerate(kept):
        tokens[i, :len(prompt)] = labels[i, :len(prompt)] = prompt
        labels[i, seq_len:seq_len + len(answer)] = answer
    used = sum(len(p) for p, _ in kept)
    stats = _stats(docs, tokens, labels, tokens.size - used, truncated)
    return Packed(tokens, labels, {**stats, "prompts": len(kept), "dropped": dropped})


def document_positions(tokens: np.ndarray, labels: np.ndarray, fmt: str, eos_id: int | None) -> np.ndarray:
    """Position ids (B, T) that restart at 0 at every document packed into a row.

    The model sees them as `position_ids` with no attention mask, which transformers turns into a
    block-causal mask (SDPA, eager) or flash-attention varlen boundaries: a document never attends to the one
    packed before it, and its rotary positions are those it has alone. The documents are found from the
    rows themselves, as packed: text documents end with EOS (`pack_text`), so the token after an EOS starts
    one; a chat row is whole conversations, each an unscored prompt then its scored answer (`pack_chat`), so
    an unscored token after a scored one starts one. Padding is split into single tokens, never scored.
    """
    B, T = tokens.shape
    start = np.zeros((B, T), dtype=bool)
    start[:, 0] = True
    if fmt == "chat":
        start[:, 1:] |= (labels[:, 1:] == IGNORE) & (labels[:, :-1] != IGNORE)
    elif eos_id is not None:
        start[:, 1:] |= tokens[:, :-1] == eos_id
    idx = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)  # where each token's document starts
    return idx - first


def position_rule(cfg: DataConfig, eos_id: int | None):
    """What the loop passes the model as positions for rows of `cfg.format`: `document_positions`, or None
    where each row is one sequence already (dpo, grpo: each conversation a sequence of its own) or where a
    pre-training recipe keeps attention across documents (`data.cross_document = true`)."""
    if cfg.format not in ("text", "chat") or (cfg.format == "text" and cfg.cross_document):
        return None
    return lambda tokens, labels: document_positions(tokens, labels, cfg.format, eos_id)


def _pad_id(tokenizer) -> int:
    """Padding is never scored, so a tokenizer without a pad token (common in imported models) pads with EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _stats(docs: int, tokens: np.ndarray, labels: np.ndarray, pad: int, truncated: int) -> dict:
    total = int(tokens.size)
    return {"documents": docs, "rows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]) if tokens.ndim == 2
            else 0, "tokens": total, "pad_tokens": pad, "padding_fraction": round(pad / total, 6) if total else 0.0,
            "scored_tokens": int((labels != IGNORE).sum()), "truncated": truncated}


def store_cached(con, key: str, packed: Packed, with_labels: bool) -> None:
    """Rows in parts of CACHE_ROWS; text rows keep no labels (they are the tokens, final padding aside)."""
    con.execute("DELETE FROM token_cache WHERE key = ?", [key])
    con.execute("DELETE FROM token_cache_meta WHERE key = ?", [key])
    for part, start in enumerate(range(0, packed.rows, CACHE_ROWS)):
        t = packed.tokens[start:start + CACHE_ROWS]
        lab = packed.labels[start:start + CACHE_ROWS].tobytes() if with_labels else None
        con.execute("INSERT INTO token_cache VALUES (?, ?, ?, ?, ?)", [key, part, len(t), t.tobytes(), lab])
    con.execute("INSERT INTO token_cache_meta VALUES (?, ?, ?)", [key, utcnow(), json.dumps(packed.stats)])


def load_cached(con, key: str) -> Packed | None:
    meta = con.execute("SELECT stats FROM token_cache_meta WHERE key = ?", [key]).fetchone()
    if meta is None:
        return None
    stats = json.loads(meta[0])
    L = stats["seq_len"]
    ts, ls = [], []
    for rows, t, lab in con.execute("SELECT rows, tokens, labels FROM token_cache WHERE key = ? ORDER BY part",
                                    [key]).fetchall():
        ts.append(np.frombuffer(t, np.int32).reshape(rows, L))
        ls.append(None if lab is None else np.frombuffer(lab, np.int32).reshape(rows, L))
    tokens = np.concatenate(ts)
    if any(x is None for x in ls):  # text rows: labels are the tokens, the final row's padding not scored
        labels = tokens.copy()
        if stats["pad_tokens"]:
            labels[-1, L - stats["pad_tokens"]:] = IGNORE
    else:
        labels = np.concatenate(ls)
    return Packed(tokens, labels, stats)


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
