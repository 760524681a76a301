"""The one conversion from a config section to the typed settings the code runs with:
``from_section(SamplingConfig, config.sampling, "config.sampling", eos_id=..., pad_id=...)``.

Each field of the dataclass (or NamedTuple) takes the section's value of the same name (``names`` maps the few that
differ), checked against the field's type (an int is accepted where a float is expected); ``overrides`` give the
values that do not come from the section (vocabulary size, token ids, derived counts). A field whose type is itself
typed settings (``PPOHyper.loss``) reads the same flat section. Fields the section lacks keep the dataclass default;
the defaults of fields that mirror the config are read from ``defaults.py``, the one place defaults are written.
A section key that no field reads, a missing required field, or a value of the wrong type is an
``errors.ConfigError`` naming ``config.<section>.<field>``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Collection, Mapping, TypeVar

from therapy_rl import errors

T = TypeVar("T")


def is_settings_type(kind: Any) -> bool:
    """A dataclass or NamedTuple class."""
    return isinstance(kind, type) and (dataclasses.is_dataclass(kind) or
                                       (issubclass(kind, tuple) and hasattr(kind, "_fields")))


def fields_of(cls: type) -> dict[str, tuple[Any, bool]]:
    """{field name: (resolved type, has a default)} of a dataclass or NamedTuple, in declaration order."""
    hints = typing.get_type_hints(cls)
    if dataclasses.is_dataclass(cls):
        return {f.name: (hints[f.name], f.default is not dataclasses.MISSING
                         or f.default_factory is not dataclasses.MISSING)
                for f in dataclasses.fields(cls) if f.init}
    if is_settings_type(cls):
        return {name: (hints[name], name in cls._field_defaults) for name in cls._fields}
    raise TypeError(f"{cls!r} is neither a dataclass nor a NamedTuple")


def positive_or_none(value: float) -> float | None:
    """The config's "<= 0 = off" as the typed settings' None."""
    return value if value > 0 else None


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _checked(value: Any, kind: Any, path: str) -> Any:
    """``value`` as ``kind`` (int -> float where a float is expected), else a ConfigError naming ``path``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _checked(value, option, path)
            except errors.ConfigError:
                pass
        raise errors.ConfigError(f"{path}={value!r}: expected {' or '.join(map(_type_name, args))}")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif origin in (tuple, list) or kind in (tuple, list):
        ok = isinstance(value, (tuple, list))
        value = tuple(value) if ok else value
    else:  # Any and types the config cannot hold: the dataclass checks them itself
        ok = True
    if not ok:
        raise errors.ConfigError(f"{path}={value!r}: expected {_type_name(kind)}")
    return value


def _build(cls: type[T], values: Mapping[str, Any], where: str, names: Mapping[str, str],
           overrides: Mapping[str, Any], read: set[str]) -> T:
    kwargs, missing = {}, []
    for name, (kind, has_default) in fields_of(cls).items():
        key = names.get(name, name)
        if key in values:
            read.add(key)
        if name in overrides:
            kwargs[name] = overrides[name]
        elif key in values:
            kwargs[name] = _checked(values[key], kind, f"{where}.{key}")
        elif is_settings_type(kind):
            kwargs[name] = _build(kind, values, where, names, overrides, read)
        elif not has_default:
            missing.append(f"{where}.{key}")
    if missing:
        raise errors.ConfigError(f"{', '.join(missing)} missing: {cls.__name__} needs a value for each")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise errors.ConfigError(f"{where}: {err}") from err


def from_section(cls: type[T], section: Mapping[str, Any], where: str, *, names: Mapping[str, str] | None = None,
                 ignore: Collection[str] = (), partial: bool = False, **overrides: Any) -> T:
    """``cls`` built from a config section (see the module docstring).

    ``names``: {field: section key} for fields named differently in the config. ``ignore``: section keys read
    elsewhere. ``partial=True``: the section also feeds other settings, so keys no field reads are not errors.
    ``overrides``: {field: value} taken as given (not type-checked), at any depth of nested settings.
    """
    values = dict(section.items())
    read: set[str] = set()
    result = _build(cls, values, where, dict(names or {}), overrides, read)
    unknown = sorted(set(values) - read - set(ignore))
    if unknown and not partial:
        raise errors.ConfigError(f"{', '.join(f'{where}.{key}' for key in unknown)}: unknown field(s), no field of "
                                 f"{cls.__name__} reads them; remove them or fix the name")
    return result
