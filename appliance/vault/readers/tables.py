"""Tables (CSV, TSV, Parquet, JSONL): read by DuckDB itself, kept as real tables in the vault (string cells
scrubbed), and rendered row by row into text records."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from appliance.vault.db import cursor
from appliance.vault.readers import Ident, ReadError, Record, fd_path, open_input

READERS = {
    ".csv": "read_csv(?, auto_detect = true, sample_size = 20480)",
    ".tsv": "read_csv(?, auto_detect = true, delim = '\t', sample_size = 20480)",
    ".parquet": "read_parquet(?)",
    ".jsonl": "read_json(?, format = 'newline_delimited')",
    ".ndjson": "read_json(?, format = 'newline_delimited')",
}
BATCH_ROWS = 2048
CellScrub = Callable[[str, str], tuple[str, Counter]]


def table_name(vid: int, path: Path) -> str:
    stem = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_") or "table"
    return f"t{vid}_{stem}"


def ingest_table(con: duckdb.DuckDBPyConnection, path: Path, target: str, scrub: CellScrub,
                 counts: Counter, ident: Ident | None = None) -> Iterator[Record]:
    """Copy `path` into `data.<target>` batch by batch, scrubbing cells; yield one record per row.

    `scrub(column, value)` returns (scrubbed value, findings per type); `counts` accumulates the findings.

    `con` must be a cursor of its own: the source query stays open while rows are inserted. DuckDB opens
    files by name, so it is handed the name of a descriptor `open_input` opened and checked (no link
    followed; the file the walk saw): a link swapped in meanwhile cannot redirect it.
    """
    reader_sql = READERS[path.suffix.lower()]
    with open_input(path, ident) as f:
        yield from _copy_table(con, fd_path(f.fileno()), path, reader_sql, target, scrub, counts)


def _copy_table(con, source: str, path: Path, reader_sql: str, target: str, scrub: CellScrub,
                counts: Counter) -> Iterator[Record]:
    writer = cursor(con)
    created, rows = False, 0
    try:
        result = con.execute(f"SELECT * FROM {reader_sql}", [source])
        batches = result.fetch_record_batch(BATCH_ROWS)
        scrub_batch = _BatchScrubber(scrub, counts)
        for batch in batches:
            batch = scrub_batch(batch)
            writer.register("_ingest_batch", batch)
            if not created:
                writer.execute(f'CREATE TABLE data."{target}" AS SELECT * FROM _ingest_batch')
                created = True
            else:
                writer.execute(f'INSERT INTO data."{target}" SELECT * FROM _ingest_batch')
            writer.unregister("_ingest_batch")
            cols = batch.schema.names
            for row in batch.to_pylist():
                rows += 1
                yield Record(kind="table", source=str(path), text=render_row(path.stem, rows, row, cols),
                             path=target, title=path.stem, meta={"row": rows}, scrubbed=True)
    except duckdb.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReadError(f"unreadable table: {msg}") from None
    finally:
        writer.close()
    if not created:
        raise ReadError("table has no rows")


def table_columns(con: duckdb.DuckDBPyConnection, target: str) -> list[list[str]]:
    return [[n, t] for n, t in con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'data' "
        "AND table_name = ? ORDER BY ordinal_position", [target]).fetchall()]


def render_row(stem: str, n: int, row: dict, cols: list[str]) -> str:
    """A table row as the text of its record (ingested and synthetic tables alike)."""
    return f"[{stem} row {n}]\n" + "\n".join(f"{c}: {'' if row[c] is None else row[c]}" for c in cols)


class _BatchScrubber:
    """Scrub every string cell with its column name as context ("ssn", "date_of_birth", "owner").

    Typed columns (a CSV's DATE column of birth dates, an integer SSN column) are tested on the first
    batch; a column where anything is found becomes text for the whole table so it can hold placeholders.
    """

    def __init__(self, scrub: CellScrub, counts: Counter):
        self.scrub = scrub
        self.counts = counts
        self.textual: set[str] | None = None

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.textual is None:
            self.textual = {f.name for f in batch.schema if _is_string(f.type)}
            for col, f in zip(batch.columns, batch.schema):
                if f.name not in self.textual and self._holds_pii(f.name, col):
                    self.textual.add(f.name)
        cols, fields = [], []
        for col, f in zip(batch.columns, batch.schema):
            if f.name in self.textual:
                cols.append(pa.array([None if v is None else self._cell(f.name, str(v)) for v in col.to_pylist()],
                                     type=pa.string()))
                fields.append(pa.field(f.name, pa.string()))
            else:
                cols.append(col)
                fields.append(f)
        return pa.RecordBatch.from_arrays(cols, schema=pa.schema(fields))

    def _cell(self, column: str, value: str) -> str:
        out, found = self.scrub(column, value)
        self.counts.update(found)
        return out

    def _holds_pii(self, column: str, col: pa.Array) -> bool:
        return any(self.scrub(column, str(v))[1] for v in col.to_pylist() if v is not None)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)
