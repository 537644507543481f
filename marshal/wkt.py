"""protobuf's helper methods of the well-known types Timestamp, Duration, Struct and ListValue.

protobuf's generated `google.protobuf.Timestamp` / `Duration` classes have conversion methods
(`GetCurrentTime`, `FromDatetime`, `ToJsonString`, `FromTimedelta`, ...) that grpcio code
uses; mrpcd-stubgen generates these types into each module that imports them, as
`class Timestamp(_wkt.Timestamp, _Message)`, so the methods live in these mixins. They read
and write only the `seconds` / `nanos` fields and follow protobuf's semantics (its
`google/protobuf/internal/well_known_types.py`): a Timestamp is UTC with `nanos` in
[0, 1e9); a Duration's `nanos` has the sign of its `seconds`; conversions to coarser units
round toward zero for Duration and down (toward the past) for Timestamp; out-of-range
values raise ValueError.
"""
from __future__ import annotations

import calendar
import datetime
import re
import time
from typing import Any

__all__ = ["Duration", "ListValue", "Struct", "Timestamp"]

_NANOS_PER_SECOND = 1_000_000_000
_NANOS_PER_MILLI = 1_000_000
_NANOS_PER_MICRO = 1_000
_SECONDS_PER_DAY = 86_400
_TIMESTAMP_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z
_TIMESTAMP_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
_DURATION_MAX = 315_576_000_000  # 10000 years
_EPOCH_NAIVE = datetime.datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH_NAIVE.replace(tzinfo=datetime.timezone.utc)
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})\Z")
_DURATION_JSON = re.compile(r"(-)?(\d+)(?:\.(\d{1,9}))?s\Z")


def _toward_zero(value: int, divider: int) -> int:
    q = abs(value) // divider
    return -q if value < 0 else q


def _fraction(nanos: int) -> str:
    """JSON's fractional part: none, or 3, 6 or 9 digits, as few as are exact."""
    if nanos == 0:
        return ""
    if nanos % _NANOS_PER_MILLI == 0:
        return f".{nanos // _NANOS_PER_MILLI:03d}"
    if nanos % _NANOS_PER_MICRO == 0:
        return f".{nanos // _NANOS_PER_MICRO:06d}"
    return f".{nanos:09d}"


def _check_timestamp(seconds: int, nanos: int) -> None:
    if not _TIMESTAMP_MIN <= seconds <= _TIMESTAMP_MAX:
        raise ValueError(f"Timestamp is not valid: seconds {seconds} must be in range "
                         f"[{_TIMESTAMP_MIN}, {_TIMESTAMP_MAX}]")
    if not 0 <= nanos < _NANOS_PER_SECOND:
        raise ValueError(f"Timestamp is not valid: nanos {nanos} must be in range [0, 999999999]")


def _check_duration(seconds: int, nanos: int) -> None:
    if not -_DURATION_MAX <= seconds <= _DURATION_MAX:
        raise ValueError(f"Duration is not valid: seconds {seconds} must be in range "
                         f"[{-_DURATION_MAX}, {_DURATION_MAX}]")
    if not -_NANOS_PER_SECOND < nanos < _NANOS_PER_SECOND:
        raise ValueError(f"Duration is not valid: nanos {nanos} must be in range [-999999999, 999999999]")
    if (nanos < 0 < seconds) or (seconds < 0 < nanos):
        raise ValueError(f"Duration is not valid: seconds {seconds} and nanos {nanos} have different signs")


class _SecondsAndNanos:
    """What Timestamp and Duration share: setting from a count of one unit, split by floor
    division into (seconds, nanos >= 0); each type's `_set` checks its range (and Duration's
    gives nanos the sign of seconds)."""

    __slots__ = ()

    # the Python value a generated constructor takes for a field of this type (datetime,
    # timedelta), and the method that sets a message from one
    _PYTHON: type  # (set by Timestamp and Duration)
    _FROM_PYTHON: str
    seconds: int  # (the generated subclass's slots)
    nanos: int

    def _set(self, seconds: int, nanos: int) -> None:
        raise NotImplementedError

    @classmethod
    def _mrpc_from_python(cls, x: Any, where: str) -> Any:
        """What a generated constructor keeps of `x` given for a field of this type: a
        datetime / timedelta made into a message (as protobuf's constructors do), anything
        else as it is (for the encoder to judge)."""
        if not isinstance(x, cls._PYTHON):
            return x
        made = cls()
        try:
            getattr(made, cls._FROM_PYTHON)(x)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return made

    def FromNanoseconds(self, nanos: int) -> None:
        self._set(nanos // _NANOS_PER_SECOND, nanos % _NANOS_PER_SECOND)

    def FromMicroseconds(self, micros: int) -> None:
        self._set(micros // 1_000_000, micros % 1_000_000 * _NANOS_PER_MICRO)

    def FromMilliseconds(self, millis: int) -> None:
        self._set(millis // 1_000, millis % 1_000 * _NANOS_PER_MILLI)

    def FromSeconds(self, seconds: int) -> None:
        self._set(seconds, 0)


class Timestamp(_SecondsAndNanos):
    """Mixin of generated `google.protobuf.Timestamp` classes: a point in time, UTC."""

    __slots__ = ()
    _PYTHON = datetime.datetime
    _FROM_PYTHON = "FromDatetime"

    def _set(self, seconds: int, nanos: int) -> None:
        _check_timestamp(seconds, nanos)
        self.seconds, self.nanos = int(seconds), int(nanos)  # type: ignore[misc]  # the subclass's slots

    def GetCurrentTime(self) -> None:
        """Set to now."""
        self.FromNanoseconds(time.time_ns())

    def ToJsonString(self) -> str:
        """RFC 3339, Z-normalised: `1972-01-01T10:00:20.021Z`."""
        _check_timestamp(self.seconds, self.nanos)
        dt = _EPOCH_NAIVE + datetime.timedelta(seconds=self.seconds)
        return dt.isoformat() + _fraction(self.nanos) + "Z"

    def FromJsonString(self, value: str) -> None:
        """Parse RFC 3339 (`1972-01-01T10:00:20.021-05:00`: up to 9 fractional digits, `Z` or
        an offset); ValueError if it is not."""
        if not isinstance(value, str):
            raise ValueError(f"Timestamp JSON value not a string: {value!r}")
        m = _RFC3339.match(value)
        if m is None:
            raise ValueError(f"Failed to parse timestamp {value!r}: expected RFC 3339 like "
                             "'1972-01-01T10:00:20.021Z' or '...-05:00'")
        try:
            dt = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
        except ValueError as exc:
            raise ValueError(f"Failed to parse timestamp {value!r}: {exc}") from None
        seconds = (dt - _EPOCH_NAIVE) // datetime.timedelta(seconds=1)
        nanos = int((m.group(2) or "").ljust(9, "0"))
        zone = m.group(3)
        if zone != "Z":
            offset = (int(zone[1:3]) * 60 + int(zone[4:6])) * 60
            seconds += -offset if zone[0] == "+" else offset
        self._set(seconds, nanos)

    def ToNanoseconds(self) -> int:
        _check_timestamp(self.seconds, self.nanos)
        return self.seconds * _NANOS_PER_SECOND + self.nanos

    def ToMicroseconds(self) -> int:
        _check_timestamp(self.seconds, self.nanos)
        return self.seconds * 1_000_000 + self.nanos // _NANOS_PER_MICRO

    def ToMilliseconds(self) -> int:
        _check_timestamp(self.seconds, self.nanos)
        return self.seconds * 1_000 + self.nanos // _NANOS_PER_MILLI

    def ToSeconds(self) -> int:
        _check_timestamp(self.seconds, self.nanos)
        return self.seconds

    def ToDatetime(self, tzinfo: datetime.tzinfo | None = None) -> datetime.datetime:
        """A naive datetime in UTC, or with `tzinfo` an aware one in that zone (microseconds:
        the nanoseconds below are dropped)."""
        _check_timestamp(self.seconds, self.nanos)
        delta = datetime.timedelta(seconds=self.seconds, microseconds=self.nanos // _NANOS_PER_MICRO)
        if tzinfo is None:
            return _EPOCH_NAIVE + delta
        return (_EPOCH_UTC + delta).astimezone(tzinfo)

    def FromDatetime(self, dt: datetime.datetime) -> None:
        """From a datetime; a naive one is taken to be UTC."""
        if not isinstance(dt, datetime.datetime):
            raise TypeError(f"Fail to convert to Timestamp. Expected a datetime object got {type(dt).__name__}")
        self._set(calendar.timegm(dt.utctimetuple()), dt.microsecond * _NANOS_PER_MICRO)

    # protobuf's arithmetic: with a Duration or timedelta gives a (naive UTC) datetime; two
    # Timestamps give a timedelta
    def __add__(self, value: Any) -> datetime.datetime:
        if isinstance(value, Duration):
            return self.ToDatetime() + value.ToTimedelta()
        return self.ToDatetime() + value  # type: ignore[no-any-return]

    __radd__ = __add__

    def __sub__(self, value: Any) -> Any:
        if isinstance(value, Timestamp):
            return self.ToDatetime() - value.ToDatetime()
        if isinstance(value, Duration):
            return self.ToDatetime() - value.ToTimedelta()
        return self.ToDatetime() - value

    def __rsub__(self, dt: Any) -> Any:
        return dt - self.ToDatetime()


class Duration(_SecondsAndNanos):
    """Mixin of generated `google.protobuf.Duration` classes: a signed span of time."""

    __slots__ = ()
    _PYTHON = datetime.timedelta
    _FROM_PYTHON = "FromTimedelta"

    def _set(self, seconds: int, nanos: int) -> None:
        """From floor-divided parts (nanos >= 0): nanos takes the sign of seconds."""
        if seconds < 0 < nanos:
            seconds, nanos = seconds + 1, nanos - _NANOS_PER_SECOND
        _check_duration(seconds, nanos)
        self.seconds, self.nanos = int(seconds), int(nanos)  # type: ignore[misc]  # the subclass's slots

    def ToJsonString(self) -> str:
        """`1.500s`, `-0.000000100s`: 0, 3, 6 or 9 fractional digits, as few as are exact."""
        _check_duration(self.seconds, self.nanos)
        sign = "-" if self.seconds < 0 or self.nanos < 0 else ""
        return f"{sign}{abs(self.seconds)}{_fraction(abs(self.nanos))}s"

    def FromJsonString(self, value: str) -> None:
        """Parse `1.5s`, `-3.100s` (up to 9 fractional digits); ValueError if it is not that."""
        if not isinstance(value, str):
            raise ValueError(f"Duration JSON value not a string: {value!r}")
        m = _DURATION_JSON.match(value)
        if m is None:
            raise ValueError(f"Couldn't parse duration {value!r}: expected seconds ending in 's', like '1.5s'")
        seconds, nanos = int(m.group(2)), int((m.group(3) or "").ljust(9, "0"))
        if m.group(1):
            seconds, nanos = -seconds, -nanos
        _check_duration(seconds, nanos)
        self.seconds, self.nanos = seconds, nanos  # type: ignore[misc]

    def ToNanoseconds(self) -> int:
        return self.seconds * _NANOS_PER_SECOND + self.nanos

    def ToMicroseconds(self) -> int:
        return self.seconds * 1_000_000 + _toward_zero(self.nanos, _NANOS_PER_MICRO)

    def ToMilliseconds(self) -> int:
        return self.seconds * 1_000 + _toward_zero(self.nanos, _NANOS_PER_MILLI)

    def ToSeconds(self) -> int:
        return self.seconds

    def ToTimedelta(self) -> datetime.timedelta:
        """A timedelta (microseconds: the nanoseconds below are dropped, toward zero)."""
        return datetime.timedelta(seconds=self.seconds, microseconds=_toward_zero(self.nanos, _NANOS_PER_MICRO))

    def FromTimedelta(self, td: datetime.timedelta) -> None:
        if not isinstance(td, datetime.timedelta):
            raise TypeError(f"Fail to convert to Duration. Expected a timedelta object got {type(td).__name__}")
        self._set(td.days * _SECONDS_PER_DAY + td.seconds, td.microseconds * _NANOS_PER_MICRO)

    def __add__(self, value: Any) -> Any:
        if isinstance(value, Timestamp):
            return self.ToTimedelta() + value.ToDatetime()
        return self.ToTimedelta() + value

    __radd__ = __add__

    def __sub__(self, value: Any) -> datetime.timedelta:
        return self.ToTimedelta() - value  # type: ignore[no-any-return]

    def __rsub__(self, value: Any) -> Any:
        return value - self.ToTimedelta()


# -- Struct / ListValue: JSON-like values --------------------------------------------------------------
#
# protobuf's Struct is a mapping of JSON-like values (`s["k"] = 1`, `s.update({...})`,
# `s["k"]`), its ListValue a sequence of them (`append`, `extend`, `l[0]`); both store
# `google.protobuf.Value` messages, whose `kind` oneof holds the Python value (as
# protobuf's `_SetStructValue` / `_GetStructValue`: None is null_value, a bool bool_value, a
# str string_value, an int or float number_value, a dict / Struct struct_value, a list /
# tuple / ListValue list_value). The Value, Struct and ListValue classes are the generated
# module's own, found through the fields' classes (`__mrpc_types__`).

_KIND = ("null_value", "number_value", "string_value", "bool_value", "struct_value", "list_value")


def _field_class(cls: Any, name: str) -> Any:
    return cls.__mrpc_types__[cls.__mrpc_fields__.index(name)]


def _get_value(value: Any) -> Any:
    """The Python value of a `Value` message (a Struct / ListValue as the message itself)."""
    for kind in _KIND:
        v = getattr(value, kind)
        if v is not None:
            return None if kind == "null_value" else v
    raise ValueError("Value not set")


def _set_value(value: Any, x: Any) -> None:
    """Set a `Value` message to the Python value `x` (its other kinds cleared); a value of
    another type is a ValueError that leaves it as it was, as protobuf's."""
    cls = type(value)
    v: Any
    if x is None:
        kind, v = "null_value", 0  # NULL_VALUE
    elif isinstance(x, bool):
        kind, v = "bool_value", x
    elif isinstance(x, str):
        kind, v = "string_value", x
    elif isinstance(x, (int, float)):
        kind, v = "number_value", float(x)
    elif isinstance(x, (dict, Struct)):
        kind, v = "struct_value", _field_class(cls, "struct_value")()
        v.update(x)
    elif isinstance(x, (list, tuple, ListValue)):
        kind, v = "list_value", _field_class(cls, "list_value")()
        v.extend(x)
    else:
        raise ValueError(f"Unexpected type {type(x).__name__} for a google.protobuf.Value")
    for other in _KIND:
        setattr(value, other, None)
    setattr(value, kind, v)


class Struct:
    """Mixin of generated `google.protobuf.Struct` classes: a mapping of JSON-like values."""

    __slots__ = ()

    fields: Any  # (the generated class's map of Value messages)

    def _value(self, key: str) -> Any:
        fields = self.fields
        v = fields.get(key)
        if v is None:
            v = fields[key] = _field_class(type(self), "fields")()
        return v

    def __getitem__(self, key: str) -> Any:
        return _get_value(self.fields[key])

    def __setitem__(self, key: str, value: Any) -> None:
        _set_value(self._value(key), value)

    def __delitem__(self, key: str) -> None:
        del self.fields[key]

    def __len__(self) -> int:
        return len(self.fields)

    def __iter__(self) -> Any:
        return iter(self.fields)

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def keys(self) -> Any:
        return self.fields.keys()

    def values(self) -> list[Any]:
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self]

    def update(self, dictionary: Any) -> None:
        for key, value in dictionary.items():
            self[key] = value

    def get_or_create_struct(self, key: str) -> Any:
        v = self._value(key)
        if v.struct_value is None:
            _set_value(v, {})
        return v.struct_value

    def get_or_create_list(self, key: str) -> Any:
        v = self._value(key)
        if v.list_value is None:
            _set_value(v, [])
        return v.list_value


class ListValue:
    """Mixin of generated `google.protobuf.ListValue` classes: a sequence of JSON-like values."""

    __slots__ = ()

    values: Any  # (the generated class's list of Value messages)

    def _new(self) -> Any:
        v = _field_class(type(self), "values")()
        self.values.append(v)
        return v

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> Any:
        return _get_value(self.values[index])

    def __setitem__(self, index: int, value: Any) -> None:
        _set_value(self.values[index], value)

    def __delitem__(self, index: int) -> None:
        del self.values[index]

    def append(self, value: Any) -> None:
        _set_value(self._new(), value)

    def extend(self, elem_seq: Any) -> None:
        for value in elem_seq:
            self.append(value)

    def items(self) -> Any:
        for i in range(len(self)):
            yield self[i]

    def add_struct(self) -> Any:
        v = self._new()
        _set_value(v, {})
        return v.struct_value

    def add_list(self) -> Any:
        v = self._new()
        _set_value(v, [])
        return v.list_value
