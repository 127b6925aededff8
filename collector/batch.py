"""Stream entries -> one Arrow table for one ClickHouse insert, plus dead letters.

Two paths, same result:
- fast: per entry, `orjson.loads`, then one Arrow array per column with type inference in
  C++ (a rows batch, the emitter's format: `zip(*rows)` makes the columns; an array of
  objects: `pyarrow.RecordBatch.from_pylist`), then column-wise checks of type, nulls and
  range. No Python call per value, except a bool check on the three float columns (Arrow
  would read `true` after a float as 1.0).
- strict: any entry the fast path does not accept whole (missing optional fields, a bad
  value, not JSON, ...) is decoded by `proxy.event.decode_batch` and converted event by event
  (`event_row`); poison entries and events with bad fields become dead letters with the
  reason, the rest is stored.

Both paths accept exactly the same values and convert them the same way (the timestamp to
DateTime64(3) ticks by `_timestamp_ticks` in both), so a batch re-formed after a crash gives
the same rows whichever path each entry took. The cyclic garbage collector is paused while
a batch is built: the decoded dicts hold no cycles and are freed by reference counting, and
the collector's generation-0 passes over them cost about a third of the decode time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
from collections.abc import Iterator, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from collector.loss import DEAD_LETTERED, LossRange, dropped_reason, ranges_of
from proxy.event import (
    EVENT_FIELDS,
    MARKER_KIND,
    SCHEMA_VERSION,
    EventDecodeError,
    RequestEvent,
    decode_batch,
    decode_dropped,
    row_columns,
)

Entry = tuple[str, dict[bytes, bytes] | None]

# Column bounds for integer fields; the others are UInt64 (see collector/schema.py).
_INT_TYPES: Final = {"http_response_status_code": pa.uint16(), "schema_version": pa.uint8(),
                     "retries": pa.uint16()}
_UINT64_MAX: Final = 2**64 - 1
MAX_TIMESTAMP: Final = 10_413_792_000.0  # 2300-01-01, past DateTime64's range end
_VERSION: Final = str(SCHEMA_VERSION).encode()


class RowError(ValueError):
    """An event whose fields can't be stored in the events table."""


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str  # timestamp | str | int | float
    default: Any
    arrow: pa.DataType
    high: int = _UINT64_MAX


def _columns() -> tuple[Column, ...]:
    columns = []
    for field in dataclasses.fields(RequestEvent):
        kind = "timestamp" if field.name == "timestamp" else str(field.type)
        if kind not in ("timestamp", "str", "int", "float"):
            raise TypeError(f"RequestEvent.{field.name} has type {field.type}: teach the "
                            "collector to store it")
        default = None if field.default is dataclasses.MISSING else field.default
        arrow = {"timestamp": pa.timestamp("ms", tz="UTC"), "str": pa.string(),
                 "float": pa.float64()}.get(kind) or _INT_TYPES.get(field.name, pa.uint64())
        high = _UINT64_MAX if kind != "int" else int(2 ** (arrow.bit_width) - 1)
        columns.append(Column(field.name, kind, default, arrow, high))
    return tuple(columns)


COLUMNS: Final = _columns()
assert tuple(c.name for c in COLUMNS) == EVENT_FIELDS
SCHEMA: Final = pa.schema([pa.field(c.name, c.arrow, nullable=False) for c in COLUMNS])
_FLOATISH: Final = tuple(itemgetter(c.name) for c in COLUMNS if c.kind in ("float", "timestamp"))
_NUMBER_TYPES: Final = frozenset({float, int})
_FLOAT_KINDS: Final = frozenset({"float", "timestamp"})


# -- strict path: one event at a time ----------------------------------------------------------

def _bad(column: Column, value: Any) -> RowError:
    return RowError(f"field {column.name}: {value!r} is not a valid {column.kind}")


def _convert(column: Column, value: Any) -> Any:
    kind = column.kind
    if kind == "str":
        if type(value) is str:
            return value
    elif kind == "int":
        if type(value) is int and 0 <= value <= column.high:
            return value
    elif kind == "float":
        if type(value) in _NUMBER_TYPES and math.isfinite(value):
            return float(value)
    elif type(value) in _NUMBER_TYPES and 0 <= value < MAX_TIMESTAMP:
        return float(value)  # seconds; _timestamp_ticks makes DateTime64(3) ticks
    raise _bad(column, value)


def event_row(event: dict[str, Any]) -> list[Any]:
    """One event as a row in EVENT_FIELDS order (timestamp still in seconds); RowError if a
    field can't be stored."""
    return [_convert(c, event.get(c.name, c.default)) for c in COLUMNS]


def _column_ok(column: Column, values: list[Any]) -> bool:
    types = set(map(type, values))
    kind = column.kind
    if kind == "str":
        return types <= {str}
    if kind == "int":
        return types <= {int} and (not values or (min(values) >= 0 and
                                                  max(values) <= column.high))
    if not types <= _NUMBER_TYPES:
        return False
    if kind == "timestamp":
        return not values or (min(values) >= 0 and max(values) < MAX_TIMESTAMP)
    return all(map(math.isfinite, values))


def event_columns(events: Sequence[dict[str, Any]]) -> list[list[Any]] | None:
    """All events as Python columns in EVENT_FIELDS order for `client.insert(...,
    column_oriented=True)` (timestamps as DateTime64(3) ticks), or None if any event has a
    bad field. For tests and tools; the collector inserts Arrow tables (`build_batch`)."""
    columns: list[list[Any]] = []
    for column in COLUMNS:
        values: list[Any] = list(map(dict.get, events, repeat(column.name),
                                     repeat(column.default)))
        if not _column_ok(column, values):
            return None
        if column.kind == "timestamp":
            values = [round(v * 1000) for v in values]
        elif column.kind == "float" and int in set(map(type, values)):
            values = list(map(float, values))
        columns.append(values)
    return columns


def _timestamp_ticks(seconds: pa.Array) -> pa.Array:
    """Seconds since the epoch -> DateTime64(3) (round half to even, like Python's round)."""
    ticks = pc.round(pc.multiply(seconds.cast(pa.float64()), 1000.0))
    return ticks.cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))


def _rows_batch(rows: list[list[Any]]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True))
    arrays = []
    for column, values in zip(COLUMNS, columns, strict=True):
        if column.kind == "timestamp":
            arrays.append(_timestamp_ticks(pa.array(values, pa.float64())))
        else:
            arrays.append(pa.array(values, column.arrow))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


# -- fast path: a whole entry at once ---------------------------------------------------------

class _NotFast(Exception):
    """The entry needs the strict path."""


def _fast_column(column: Column, decoded: pa.RecordBatch) -> pa.Array:
    index = decoded.schema.get_field_index(column.name)
    if index < 0:
        raise _NotFast  # an omitted optional field: the strict path fills the default
    return _checked(column, decoded.column(index))


def _checked(column: Column, array: pa.Array) -> pa.Array:
    """The column's array as stored; _NotFast if a value is of the wrong type or range."""
    if array.null_count:
        raise _NotFast
    kind, inferred = column.kind, array.type
    if kind == "str":
        if inferred != pa.string():
            raise _NotFast
        return array
    if kind == "int":
        if inferred != pa.int64():
            raise _NotFast  # a float (Arrow would truncate 200.5) or a bool
        low_high = pc.min_max(array)
        if low_high["min"].as_py() < 0 or low_high["max"].as_py() > column.high:
            raise _NotFast
        return array.cast(column.arrow)
    if inferred not in (pa.float64(), pa.int64()):
        raise _NotFast
    array = array.cast(pa.float64())
    if not pc.all(pc.is_finite(array)).as_py():
        raise _NotFast
    if kind == "timestamp":
        low_high = pc.min_max(array)
        if low_high["min"].as_py() < 0 or low_high["max"].as_py() >= MAX_TIMESTAMP:
            raise _NotFast
        return _timestamp_ticks(array)
    return array


def _fast_rows(columns: bytes, payload: bytes) -> pa.RecordBatch | None:
    """A rows batch (fields `c` and `b`) as a record batch, or None (the strict path)."""
    try:
        names = _names(columns)
        rows = orjson.loads(payload)
        if type(rows) is not list:
            return None
        if not rows:
            return _EMPTY
        if set(map(type, rows)) != {list} or set(map(len, rows)) != {len(names)}:
            return None
        by_name = dict(zip(names, zip(*rows, strict=True), strict=True))
        arrays = []
        for column in COLUMNS:
            values = by_name.get(column.name)
            if values is None:
                return None  # an omitted optional field: the strict path fills the default
            if column.kind in _FLOAT_KINDS and not _NUMBER_TYPES.issuperset(map(type, values)):
                return None  # e.g. a bool, which Arrow would take for 1.0
            arrays.append(_checked(column, pa.array(values)))
    except Exception:  # _NotFast or anything unusual: the strict path decides, and says why
        return None
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


@functools.lru_cache(maxsize=64)
def _names(columns: bytes) -> tuple[str, ...]:
    return row_columns(columns)


def _fast_batch(fields: dict[bytes, bytes]) -> pa.RecordBatch | None:
    """The entry's events as a record batch, or None if the strict path must look at it."""
    if fields.get(b"v") != _VERSION:
        return None
    payload = fields.get(b"b")
    if payload is None:
        return None
    columns = fields.get(b"c")
    if columns is not None:
        return _fast_rows(columns, payload)
    try:
        items = orjson.loads(payload)
        if type(items) is not list:
            return None
        if not items:
            return _EMPTY
        if not all(_NUMBER_TYPES.issuperset(map(type, map(get, items))) for get in _FLOATISH):
            return None  # e.g. a bool, which Arrow would take for 1.0
        decoded = pa.RecordBatch.from_pylist(items)
        arrays = [_fast_column(column, decoded) for column in COLUMNS]
    except Exception:  # _NotFast or anything unusual: the strict path decides, and says why
        return None
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


_EMPTY: Final = pa.RecordBatch.from_pylist([], schema=SCHEMA)


# -- a batch ----------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class DeadLetter:
    entry_id: str
    reason: str
    fields: dict[bytes, bytes]


@dataclasses.dataclass(slots=True)
class Batch:
    """What one read of the stream turned into: rows to insert, entries to dead-letter."""

    entry_ids: list[str]
    table: pa.Table
    events_in: int  # events in decodable entries, stored or not
    dead: list[DeadLetter]
    losses: list[LossRange] = dataclasses.field(default_factory=list)  # to record in event_loss

    @property
    def rows(self) -> int:
        return int(self.table.num_rows)


def _strict_entry(entry_id: str, fields: dict[bytes, bytes], batches: list[pa.RecordBatch],
                  dead: list[DeadLetter], losses: list[LossRange]) -> int:
    """Decode one entry event by event; return the number of events it held."""
    try:
        version = fields.get(b"v")
        payload = fields.get(b"b")
        if version is None or payload is None:
            raise EventDecodeError("entry lacks the fields v and b")
        events = decode_batch(version, payload, fields.get(b"c"))
    except EventDecodeError as exc:
        dead.append(DeadLetter(entry_id, f"undecodable entry: {exc}", fields))
        return 0
    rows: list[list[Any]] = []
    rejected: list[dict[str, Any]] = []
    reasons: set[str] = set()
    for event in events:
        try:
            rows.append(event_row(event))
        except RowError as exc:
            rejected.append(event)
            reasons.add(str(exc))
    if rejected:
        losses.extend(_numbered(rejected))
        dead.append(DeadLetter(
            entry_id, f"{len(rejected)} event(s) with bad fields: " + "; ".join(
                sorted(reasons)[:5]), {b"v": _VERSION, b"b": orjson.dumps(rejected)}))
    if rows:
        batches.append(_rows_batch(rows))
    return len(events)


def _numbered(events: list[dict[str, Any]]) -> list[LossRange]:
    """Loss ranges (dead_lettered) of the numbered events among `events`."""
    by_emitter: dict[str, list[int]] = {}
    for event in events:
        emitter, seq = event.get("gateway_emitter"), event.get("gateway_event_seq")
        if type(emitter) is str and emitter and type(seq) is int and seq > 0:
            by_emitter.setdefault(emitter, []).append(seq)
    return [r for emitter, seqs in by_emitter.items()
            for r in ranges_of(emitter, seqs, DEAD_LETTERED)]


def _marker_entry(entry_id: str, fields: dict[bytes, bytes], losses: list[LossRange],
                  dead: list[DeadLetter]) -> None:
    """A non-event entry: a "dropped" marker becomes loss ranges; anything else is poison."""
    try:
        if fields.get(b"k") != MARKER_KIND.encode():
            raise EventDecodeError(f"unknown entry kind {fields.get(b'k')!r}")
        if fields.get(b"v") != _VERSION:
            raise EventDecodeError(f"unsupported marker version {fields.get(b'v')!r}")
        dropped = decode_dropped(fields.get(b"d") or b"")
    except EventDecodeError as exc:
        dead.append(DeadLetter(entry_id, f"undecodable entry: {exc}", fields))
        return
    losses.extend(LossRange(d.emitter, d.seq_from, d.seq_to, dropped_reason(d.reason))
                  for d in dropped)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_batch(entries: Sequence[Entry]) -> Batch:
    """Decode and convert stream entries; poison entries and bad events become dead letters."""
    batches: list[pa.RecordBatch] = []
    dead: list[DeadLetter] = []
    losses: list[LossRange] = []
    events_in = 0
    with _gc_paused():
        for entry_id, fields in entries:
            if not fields:
                dead.append(DeadLetter(entry_id, "entry was deleted from the stream before it "
                                                 "was stored (stream trimmed by MAXLEN?)", {}))
                continue
            if b"b" not in fields and b"k" in fields:
                _marker_entry(entry_id, fields, losses, dead)
                continue
            fast = _fast_batch(fields)
            if fast is not None:
                events_in += fast.num_rows
                if fast.num_rows:
                    batches.append(fast)
            else:
                events_in += _strict_entry(entry_id, fields, batches, dead, losses)
        table = pa.Table.from_batches(batches, schema=SCHEMA)
    return Batch([entry_id for entry_id, _ in entries], table, events_in, dead, losses)
