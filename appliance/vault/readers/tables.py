"""Tables (CSV, TSV, Parquet, JSONL): read by DuckDB itself, kept as real tables in the vault (string cells
scrubbed), and rendered row by row into text records."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from appliance.vault.db import cursor, first_line
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
NameScrub = Callable[[str], str]  # a table's or column's name as it lands (PII in it scrubbed)
# Keys of a nested record that say nothing by themselves: read with the record's own ("identifier value")
_GENERIC_KEYS = frozenset(("value", "text", "display"))


def table_name(vid: int, path: Path) -> str:
    stem = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_") or "table"
    return f"t{vid}_{stem}"


def ingest_table(con: duckdb.DuckDBPyConnection, path: Path, target: str, scrub: CellScrub,
                 counts: Counter, ident: Ident | None = None, name: NameScrub = str) -> Iterator[Record]:
    """Copy `path` into `data.<target>` batch by batch, scrubbing cells; yield one record per row.

    `scrub(column, value)` returns (scrubbed value, findings per type); `counts` accumulates the findings.
    `name` scrubs the file's stem (the records' title) and the column names, which land as they return them.

    `con` must be a cursor of its own: the source query stays open while rows are inserted.
    """
    writer = cursor(con)
    created = False
    try:
        for batch, records in read_table(con, path, target, scrub, counts, ident, name):
            try:
                writer.register("_ingest_batch", batch)
                writer.execute(f'{"INSERT INTO" if created else "CREATE TABLE"} data."{target}" '
                               f'{"" if created else "AS "}SELECT * FROM _ingest_batch')
                writer.unregister("_ingest_batch")
            except duckdb.Error as e:
                raise ReadError(unreadable(e)) from None
            created = True
            yield from records
    finally:
        writer.close()


def read_table(con: duckdb.DuckDBPyConnection, path: Path, target: str, scrub: CellScrub, counts: Counter,
               ident: Ident | None = None, name: NameScrub = str) -> Iterator[tuple[pa.RecordBatch, Iterator[Record]]]:
    """The rows of `path`, scrubbed: each batch (cells and column names as they land) with its rows' records,
    whose `path` is `target`, the data table they will be in. Nothing is written: `ingest_table` writes the
    batches into the vault as they come, a worker process (`scan.scan_table`) hands them to the ingest process,
    which writes them whole (`VersionBuilder.create_table`).

    A batch's records are rendered one at a time as they are taken, and must be taken before the next batch:
    each repeats every column's name, so a wide table's rows can be far larger as text than as cells.

    DuckDB opens files by name, so it is handed the name of a descriptor `open_input` opened and checked (no
    link followed; the file the walk saw): a link swapped in meanwhile cannot redirect it.
    """
    reader_sql = READERS[path.suffix.lower()]
    rows = 0
    stem = name(path.stem)
    with open_input(path, ident) as f:
        source = fd_path(f.fileno())
        try:
            batches = con.execute(f"SELECT * FROM {reader_sql}", [source]).fetch_record_batch(BATCH_ROWS)
            scrub_batch = _BatchScrubber(scrub, counts, name)
            for batch in batches:
                batch = scrub_batch(batch)
                yield batch, _records(batch, stem, rows, str(path), target)
                rows += batch.num_rows
        except duckdb.Error as e:  # DuckDB names the descriptor it read: the file's name says more
            raise ReadError(unreadable(e).replace(source, path.name)) from None
    if not rows:
        raise ReadError("table has no rows")


def _records(batch: pa.RecordBatch, stem: str, before: int, source: str, target: str) -> Iterator[Record]:
    cols = batch.schema.names
    for n, row in enumerate(batch.to_pylist(), before + 1):
        yield Record(kind="table", source=source, text=render_row(stem, n, row, cols), path=target, title=stem,
                     meta={"row": n}, scrubbed=True)


def unreadable(e: Exception) -> str:
    """Why a table could not be read or written, in one line."""
    return f"unreadable table: {first_line(e)}"


def table_columns(con: duckdb.DuckDBPyConnection, target: str) -> list[list[str]]:
    """[[name, DuckDB type], ...] of `data.<target>`, in order. DESCRIBE reads the one table's entry, where
    `duckdb_columns()` lists every column of every table first (3 ms a call with 300 tables in the vault)."""
    quoted = target.replace('"', '""')
    return [[n, t] for n, t, *_ in con.execute(f'DESCRIBE data."{quoted}"').fetchall()]


def render_row(stem: str, n: int, row: dict, cols: list[str]) -> str:
    """A table row as the text of its record (ingested and synthetic tables alike)."""
    return f"[{stem} row {n}]\n" + "\n".join(f"{c}: {'' if row[c] is None else row[c]}" for c in cols)


class _BatchScrubber:
    """Scrub every string cell with its column name as context ("ssn", "date_of_birth", "owner"), and the
    column names themselves (`name`; a clash after scrubbing gets `_2`, `_3`, ...).

    Typed columns (a CSV's DATE column of birth dates, an integer SSN column) are tested on the first
    batch; a column where anything is found becomes text for the whole table so it can hold placeholders.
    Nested columns (a JSON object or list) keep their type, and every string in them is scrubbed in every
    batch (`_deep`).
    """

    def __init__(self, scrub: CellScrub, counts: Counter, name: NameScrub = str):
        self.scrub = scrub
        self.counts = counts
        self.name = name
        self.textual: set[str] | None = None
        self.names: dict[str, str] | None = None  # column name as read -> as it lands
        self._fields: dict[pa.DataType, dict[str, str]] = {}  # a record type -> its field names as they land

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.names is None:  # cells are scrubbed with their column's name as it lands: no PII in the context
            self.names = _landing_names([f.name for f in batch.schema], self.name)
        if self.textual is None:
            self.textual = {f.name for f in batch.schema if _is_string(f.type)}
            for col, f in zip(batch.columns, batch.schema):
                if f.name not in self.textual and self._holds_pii(self.names[f.name], col):
                    self.textual.add(f.name)
        cols, fields = [], []
        for col, f in zip(batch.columns, batch.schema):
            if pa.types.is_nested(f.type):  # records and lists (JSON objects): every string in them, in every batch
                landed = self.names[f.name]
                t = self._landed_type(f.type)
                cols.append(pa.array([self._deep(landed, v, f.type) for v in col.to_pylist()], type=t))
                fields.append(pa.field(landed, t, f.nullable))
            elif f.name in self.textual:
                landed = self.names[f.name]
                cols.append(pa.array([None if v is None else self._cell(landed, str(v)) for v in col.to_pylist()],
                                     type=pa.string()))
                fields.append(pa.field(self.names[f.name], pa.string()))
            else:
                cols.append(col)
                fields.append(f.with_name(self.names[f.name]))
        return pa.RecordBatch.from_arrays(cols, schema=pa.schema(fields))

    def _cell(self, column: str, value: str) -> str:
        out, found = self.scrub(column, value)
        if found:  # most cells hold nothing: no update of the counts for them
            self.counts.update(found)
        return out

    def _landed_type(self, t: pa.DataType) -> pa.DataType:
        """A nested type with its records' field names as they land: scrubbed as column names are ("scores":
        {"Margaret Okonkwo": 5} holds a name in a field's name), and distinct."""
        if pa.types.is_struct(t):
            names = self._struct_names(t)
            return pa.struct([pa.field(names[t.field(i).name], self._landed_type(t.field(i).type), t.field(i).nullable)
                              for i in range(t.num_fields)])
        if pa.types.is_map(t):
            return pa.map_(t.key_type, self._landed_type(t.item_type))
        if pa.types.is_large_list(t):
            return pa.large_list(self._landed_type(t.value_type))
        if pa.types.is_fixed_size_list(t):
            return pa.list_(self._landed_type(t.value_type), t.list_size)
        if pa.types.is_list(t):
            return pa.list_(self._landed_type(t.value_type))
        return t

    def _struct_names(self, t: pa.StructType) -> dict[str, str]:
        """A record type's field names as they land: scrubbed once per table (the counts take what the names
        held once), not for each value."""
        if t not in self._fields:
            self._fields[t] = _landing_names([t.field(i).name for i in range(t.num_fields)], self.name)
        return self._fields[t]

    def _deep(self, column: str, value, t: pa.DataType):
        """A nested value of type `t` with each string in it scrubbed, read with its key as the column ("name",
        "dob"), a record's field names and a map's keys too; a number or date in it that holds PII becomes null
        (it cannot hold a placeholder)."""
        if value is None:
            return None
        if pa.types.is_struct(t):
            names = self._struct_names(t)
            # a generic key is read with its record's ("identifier" "value", a name's "text")
            return {names[k]: self._deep(f"{column}_{k}" if k in _GENERIC_KEYS else str(k), v, t.field(k).type)
                    for k, v in value.items()}
        if pa.types.is_map(t):
            out, taken = [], set()
            for k, v in value:
                landed = base = self._cell(column, k) if isinstance(k, str) else k
                i = 2
                while landed in taken:  # two keys that land as one placeholder stay two keys
                    landed, i = f"{base}_{i}", i + 1
                taken.add(landed)
                out.append((landed, self._deep(str(k), v, t.item_type)))
            return out
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return [self._deep(column, v, t.value_type) for v in value]
        if isinstance(value, str):
            return self._cell(column, value)
        if isinstance(value, bool):
            return value
        out, found = self.scrub(column, str(value))
        if found:
            self.counts.update(found)
            return None
        return value

    def _holds_pii(self, column: str, col: pa.Array) -> bool:
        return any(self.scrub(column, str(v))[1] for v in col.to_pylist() if v is not None)


def _landing_names(columns: list[str], name: NameScrub) -> dict[str, str]:
    """Each column's name as it lands: scrubbed, and distinct (case-insensitively, as DuckDB wants)."""
    out, taken = {}, set()
    for c in columns:
        base = landed = name(c)
        i = 2
        while landed.lower() in taken:
            landed, i = f"{base}_{i}", i + 1
        taken.add(landed.lower())
        out[c] = landed
    return out


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def rescrub_table(con: duckdb.DuckDBPyConnection, source: str, target: str, scrub: CellScrub, counts: Counter,
                  name: NameScrub = str) -> None:
    """Copy the vault's table `data.<source>` to `data.<target>`, its cells and column names scrubbed again
    (`vault ingest --rescrub`). `con` must be a cursor of its own, as for `ingest_table`."""
    writer = cursor(con)
    created = False
    try:
        batches = con.execute(f'SELECT * FROM data."{source}"').fetch_record_batch(BATCH_ROWS)
        scrub_batch = _BatchScrubber(scrub, counts, name)
        for batch in batches:
            writer.register("_rescrub_batch", scrub_batch(batch))
            writer.execute(f'{"INSERT INTO" if created else "CREATE TABLE"} data."{target}" '
                           f'{"" if created else "AS "}SELECT * FROM _rescrub_batch')
            writer.unregister("_rescrub_batch")
            created = True
    finally:
        writer.close()
    if not created:  # an empty table stays one, with its columns
        con.execute(f'CREATE TABLE data."{target}" AS SELECT * FROM data."{source}" LIMIT 0')
