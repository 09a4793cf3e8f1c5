"""Reading records that come from outside (etcd values, wire headers): strict about types,
lenient about what it does not know.

Any agent may read a record written by an older or newer ftvm, or a value an operator
typed by hand. The rules:
  * a field this version does not know is ignored (records stay forward compatible);
  * a missing field takes its default, if it has one; a missing required field, a wrong
    type, a string that is too long or a number out of range is a `RecordError` naming
    the field;
  * a record whose version `v` is newer than `RECORD_VERSION` is a `RecordError`: its
    meaning may have changed, so it is not guessed at.
Callers turn a `RecordError` into an event and leave that one record (and only it) alone.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import Enum
from functools import cache
from typing import Any, TypeVar

RECORD_VERSION = 1
MAX_STRING = 4096          # longest string field accepted (paths, reasons, details)
MAX_ITEMS = 256            # longest list or map accepted (disks, NICs, copies, ...)
MAX_INT = 1 << 64          # etcd lease ids and revisions are 64-bit

T = TypeVar("T")


class RecordError(ValueError):
    """A record from outside that cannot be used as it is; the message names the field."""


def check_version(d: dict[str, Any], what: str) -> None:
    v = d.get("v", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RecordError(f"{what}: version {v!r} is not a positive integer")
    if v > RECORD_VERSION:
        raise RecordError(f"{what}: written by a newer ftvm (record version {v}; this agent reads "
                          f"up to {RECORD_VERSION}): upgrade this agent")


def as_object(d: object, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise RecordError(f"{what}: expected a JSON object, got {type(d).__name__}")
    if len(d) > 4 * MAX_ITEMS:
        raise RecordError(f"{what}: {len(d)} fields is too many")
    return d


def value(kind: Any, x: object, what: str) -> Any:
    """`x` checked against the type annotation `kind` (str, int, float, bool, an Enum,
    X | None, tuple[X, ...], dict[str, X])."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if x is None:
            return None
        if len(args) == 1:
            return value(args[0], x, what)
        raise TypeError(f"unsupported annotation {kind}")  # a programming error, not bad data
    if origin is tuple:
        if not isinstance(x, (list, tuple)):
            raise RecordError(f"{what}: expected a list")
        if len(x) > MAX_ITEMS:
            raise RecordError(f"{what}: {len(x)} items is too many (at most {MAX_ITEMS})")
        item = typing.get_args(kind)[0]
        return tuple(value(item, e, f"{what}[{i}]") for i, e in enumerate(x))
    if origin is dict:
        if not isinstance(x, dict):
            raise RecordError(f"{what}: expected an object")
        if len(x) > MAX_ITEMS:
            raise RecordError(f"{what}: {len(x)} entries is too many (at most {MAX_ITEMS})")
        item = typing.get_args(kind)[1]
        return {value(str, k, what): value(item, e, f"{what}.{k}") for k, e in x.items()}
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(x)
        except ValueError:
            raise RecordError(f"{what}: {x!r} is not one of {[e.value for e in kind]}") from None
    if kind is bool:
        if not isinstance(x, bool):
            raise RecordError(f"{what}: expected true or false")
        return x
    if kind is int:
        if not isinstance(x, int) or isinstance(x, bool):
            raise RecordError(f"{what}: expected an integer")
        if not -MAX_INT <= x <= MAX_INT:
            raise RecordError(f"{what}: {x} is out of range")
        return x
    if kind is float:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
            raise RecordError(f"{what}: expected a finite number")
        if abs(x) > MAX_INT:
            raise RecordError(f"{what}: {x} is out of range")
        return float(x)
    if kind is str:
        if not isinstance(x, str):
            raise RecordError(f"{what}: expected a string")
        if len(x) > MAX_STRING:
            raise RecordError(f"{what}: {len(x)} characters is too long (at most {MAX_STRING})")
        if "\x00" in x:
            raise RecordError(f"{what}: contains a NUL character")
        return x
    raise TypeError(f"unsupported annotation {kind}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_fields(cls: type[T], d: object, what: str, **given: Any) -> T:
    """A flat dataclass from a JSON object: each known field checked against its
    annotation, unknown fields ignored. `given` supplies fields read by the caller
    (nested records), which are not looked up in `d`."""
    obj = as_object(d, what)
    hints = _hints(cls)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = dict(given)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in given:
            continue
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{what}: field {f.name!r} is missing")
            continue
        kwargs[f.name] = value(hints[f.name], obj[f.name], f"{what}.{f.name}")
    return cls(**kwargs)
