"""Config values checked against the types of the dataclass fields they fill, with the dotted key.

YAML hands the trainer's configs over loosely typed: `1e-3` is a string (YAML 1.1 needs a dot in a
float), a quoted `'false'` is a non-empty, truthy string. Every section of `distillkit train`'s YAML
(`loss` -> DistillationConfig, `training` -> transformers.TrainingArguments, `data` -> DataOptions)
and every dict given to DistillationConfig / CurriculumConfig goes through `coerce_fields`:

- float fields take ints, floats and strings that spell a number ("1e-3");
- int fields take ints, integral floats and strings that spell an integer ("128");
- bool fields take only true/false: "false", "no", 0 and 1 are errors, never truthy;
- str and Enum fields take strings (an Enum's value, checked against its choices);
- Optional[...] takes None; dict/list fields take a mapping / a list.

Failures are ConfigError naming the dotted key (`loss.beta`), and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import re
import types
import typing
from typing import Any, Mapping, Optional

__all__ = ["ConfigError", "coerce_fields", "coerce_value", "field_errors"]

_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
_INT = re.compile(r"[+-]?\d+")


class ConfigError(ValueError):
    """A bad config value or key. `key` is the dotted path ("loss.beta"; None when the error is about
    the config as a whole), `reason` the message without it."""

    def __init__(self, reason: str, *, key: Optional[str] = None):
        self.reason, self.key = reason, key
        super().__init__(f"{key}: {reason}" if key else reason)

    def within(self, section: str) -> "ConfigError":
        """The same error one level down: key "beta" in section "loss" -> "loss.beta"."""
        return ConfigError(self.reason, key=f"{section}.{self.key}" if self.key else section)


class field_errors:
    """`with field_errors("beta"): check(...)` turns a TypeError/ValueError of the check into a
    ConfigError with key "beta" (and drops a leading "beta " from the message, which names it)."""

    def __init__(self, key: str):
        self.key = key

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, ConfigError) or not isinstance(exc, (TypeError, ValueError)):
            return False
        reason = str(exc)
        if reason.startswith(self.key + " "):
            reason = reason[len(self.key) + 1:]
        raise ConfigError(reason, key=self.key) from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    raise ConfigError(f"must be a number; got {_describe(value)}", key=key)


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    raise ConfigError(f"must be an integer; got {_describe(value)}", key=key)


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    hint = " (write true or false without quotes)" if isinstance(value, str) else ""
    raise ConfigError(f"must be true or false; got {_describe(value)}{hint}", key=key)


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"must be a string; got {_describe(value)}", key=key)


def _as_enum(value: Any, kind: type, key: str):
    choices = [member.value for member in kind]
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and value in choices:
        return value
    raise ConfigError(f"must be one of {choices}; got {_describe(value)}", key=key)


_SIMPLE = {float: _as_float, int: _as_int, bool: _as_bool, str: _as_str}
_CONTAINERS = {dict: (Mapping, "a mapping"), list: ((list, tuple), "a list"), tuple: ((list, tuple), "a list")}


def _candidates(annotation) -> tuple[list, bool]:
    """(the non-None members of `annotation`, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = list(typing.get_args(annotation))
    else:
        members = [annotation]
    allows_none = type(None) in members or any(typing.get_origin(m) is typing.Literal and None in
                                               typing.get_args(m) for m in members)
    return [m for m in members if m is not type(None)], allows_none


def _matches_exactly(value: Any, member) -> bool:
    """`value` is already of type `member` (bool is not an int here)."""
    if member in (int, float):
        return isinstance(value, (int, float) if member is float else int) and not isinstance(value, bool)
    if member in (bool, str):
        return isinstance(value, member)
    if typing.get_origin(member) is typing.Literal:
        return any(value is choice or (type(value) is type(choice) and value == choice)
                   for choice in typing.get_args(member))
    if isinstance(member, type) and issubclass(member, enum.Enum):
        return isinstance(value, member)
    container = typing.get_origin(member) or member
    if container in _CONTAINERS:
        return isinstance(value, _CONTAINERS[container][0])
    return False


def coerce_value(value: Any, annotation, key: str) -> Any:
    """`value` checked (and converted where the config format is loose) against `annotation`."""
    if annotation is Any or annotation is typing.Any:
        return value
    members, allows_none = _candidates(annotation)
    if value is None:
        if allows_none:
            return None
        raise ConfigError("must be set; got null", key=key)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums and isinstance(value, str):  # `SchedulerType | str` means one of the enum's values
        return _as_enum(value, enums[0], key)
    for member in members:  # a value already of one of the types is taken as it is
        if _matches_exactly(value, member):
            return float(value) if member is float else value
    errors = []
    for member in members:
        try:
            if member in _SIMPLE:
                return _SIMPLE[member](value, key)
            if isinstance(member, type) and issubclass(member, enum.Enum):
                return _as_enum(value, member, key)
            if typing.get_origin(member) is typing.Literal:
                choices = [c for c in typing.get_args(member) if c is not None]
                raise ConfigError(f"must be one of {choices}; got {_describe(value)}", key=key)
            container = typing.get_origin(member) or member
            if container in _CONTAINERS:
                raise ConfigError(f"must be {_CONTAINERS[container][1]}; got {_describe(value)}", key=key)
            if isinstance(member, type) and dataclasses.is_dataclass(member) and isinstance(value, Mapping):
                return value  # nested sections are coerced by their own class
            if isinstance(member, type) and isinstance(value, member):
                return value
            name = str(getattr(member, "__name__", member))
            raise ConfigError(f"must be {'an' if name[:1] in 'AEIOU' else 'a'} {name}; got {_describe(value)}", key=key)
        except ConfigError as exc:
            errors.append(exc.reason)
    if len(errors) == 1:
        raise ConfigError(errors[0], key=key)
    raise ConfigError(" or ".join(dict.fromkeys(e.split("; got")[0] for e in errors)) + f"; got {_describe(value)}",
                      key=key)


@functools.lru_cache(maxsize=None)
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def unknown_key_error(key: str, known, section: Optional[str] = None, *, owner: Optional[str] = None,
                      aliases: Optional[Mapping[str, str]] = None) -> ConfigError:
    """An unknown `key`: names the known key it most likely means (from `aliases`, else the closest
    spelling), else lists the known keys (or, when there are many, names their `owner`)."""
    guess = (aliases or {}).get(key)
    close = [guess] if guess in known else difflib.get_close_matches(key, list(known), n=1)
    if close:
        hint = f"; did you mean {close[0]!r}?"
    elif len(known) > 20 and owner:
        hint = f": not an option of {owner}"
    else:
        hint = f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown key{hint}", key=f"{section}.{key}" if section else key)


def coerce_fields(cls, values: Mapping[str, Any], section: Optional[str] = None, *,
                  aliases: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """`values` (a mapping of field name -> value) checked against the init fields of the dataclass
    `cls`: unknown keys (with `aliases`: common other names of fields, for the hint) and ill-typed
    values raise ConfigError with the key (prefixed by `section`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"must be a mapping; got {_describe(values)}", key=section)
    types_of = _field_types(cls)
    out = {}
    for key, value in values.items():
        if key not in types_of:
            raise unknown_key_error(str(key), types_of, section, owner=f"{cls.__module__.split('.')[0]}."
                                    f"{cls.__name__}", aliases=aliases)
        out[key] = coerce_value(value, types_of[key], f"{section}.{key}" if section else key)
    return out
