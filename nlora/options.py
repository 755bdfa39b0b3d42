"""Typed options: one machinery for the run's core configuration (nlora.config.RunConfig) and for each method's
own options (a `MethodOptions` dataclass in the method's file). A field declared with `option(...)` carries its
help text and its checks (choices, bounds, per-task lists); `coerce` turns a YAML or command-line value into the
field's type, and `check_fields` validates a whole dataclass, each error naming the option.

Names: a Python keyword gets a trailing underscore as a field (`lambda_`); users write it without (`lambda`), in
YAML keys and flags alike (`--lambda`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import NloraError

MAX_INT = 2**31 - 1  # the largest value an integer option takes

__all__ = ["option", "MethodOptions", "public_name", "field_name", "coerce", "check_fields", "base_type",
           "option_fields", "default_of"]


def option(help: str, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
           choices: tuple | None = None, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, per_task: bool = False, per_task_of: str | None = None,
           former_defaults: tuple = ()) -> Any:
    """A dataclass field with its help and checks. `minimum`/`maximum` are inclusive bounds, `above` an
    exclusive lower bound; on a list they apply to each value. `per_task`: a list with one value per task, in
    training order; `per_task_of`: the scalar option this list replaces (a scalar set by the user drops a
    preset's list). `former_defaults`: the defaults of earlier releases (a saved run of another method that
    records one still reads as holding the default)."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above,
            "per_task": per_task or per_task_of is not None, "per_task_of": per_task_of,
            "former_defaults": tuple(former_defaults)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def public_name(name: str) -> str:
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def field_name(key: str) -> str:
    """The field of a user key: `lambda` -> `lambda_`, `penalty-form` -> `penalty_form`."""
    key = key.replace("-", "_")
    return key + "_" if key in ("lambda",) else key


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass, once per class (resolving them costs about 1 ms a field, and the
    CLI's parser asks for every option's)."""
    return typing.get_type_hints(cls)


def _hint(cls, f: dataclasses.Field):
    return _type_hints(cls)[f.name]


def _strip_optional(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def base_type(cls, f: dataclasses.Field) -> type:
    """The non-None type of a field: int for `int | None`, list for `list[str]`."""
    tp = _strip_optional(_hint(cls, f))
    return typing.get_origin(tp) or tp


def is_optional(cls, f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(_hint(cls, f))


def list_item_type(cls, f: dataclasses.Field) -> type:
    return typing.get_args(_strip_optional(_hint(cls, f)))[0]


def type_name(cls, f: dataclasses.Field) -> str:
    tp = base_type(cls, f)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "a list of strings (or a comma-separated string)"}
    text = names.get(tp, str(tp))
    if tp is list and list_item_type(cls, f) in (float, int):
        text = "a list of numbers (or a comma-separated string)"
    return text + " or null" if is_optional(cls, f) else text


def coerce(cls, f: dataclasses.Field, value: Any, source: str) -> Any:
    """`value` (from YAML, a flag string, or Python) as field `f`'s type, or an error naming the key."""
    name = public_name(f.name)
    tp = base_type(cls, f)

    def fail():
        raise NloraError(f"{source}: key '{name}' must be {type_name(cls, f)}, got {value!r}")

    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and is_optional(cls, f)):
        if is_optional(cls, f):
            return None
        fail()
    if tp is list:
        item = list_item_type(cls, f)
        if isinstance(value, str):
            value = split_list(value)
        if isinstance(value, dict) and item is str:  # a YAML mapping: KEY=VALUE items (task_metrics)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                fail()
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, (list, tuple)):
            fail()
        if item in (float, int):
            if any(isinstance(v, bool) for v in value):
                fail()
            try:
                return [float(v) for v in value]
            except (TypeError, ValueError):
                fail()
        if not all(isinstance(v, str) for v in value):
            fail()
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        fail()
    if tp is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                fail()
        if not isinstance(value, int):
            fail()
        if abs(value) > MAX_INT:  # 1e10 epochs, or a seed numpy cannot take: a slip, not a setting
            raise NloraError(f"{source}: key '{name}' is out of range: {value} (at most {MAX_INT} in size)")
        return value
    if tp is float:
        if isinstance(value, bool):
            fail()
        try:
            out = float(value)
        except (TypeError, ValueError):
            fail()
        if math.isnan(out):
            fail()
        return out
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        fail()
    return value


def split_list(text: str) -> list[str]:
    """The items of a comma-separated string; a comma inside parentheses belongs to its item
    (`a=rouge_l(tokenizer=char, stemmer=false),b=sari` is two items)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if c == "," and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [v.strip() for v in items if v.strip()]


def check_fields(obj, n_tasks: int | None = None) -> None:
    """The checks declared with `option` (choices, bounds, finiteness, per-task list lengths), each error naming
    the option."""
    for f in option_fields(type(obj)):
        value = getattr(obj, f.name)
        if value is None:
            continue
        meta, name = f.metadata, public_name(f.name)

        def bad(why: str):
            raise NloraError(f"option '{name}': {why}")

        if meta.get("choices") and value not in meta["choices"]:
            bad(f"{value!r} is not one of {', '.join(map(str, meta['choices']))}")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        what = "values" if isinstance(value, list) else "must"
        shown = value
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            bad(f"{'values must' if what == 'values' else 'must'} be finite, got {shown}")
        low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
        prefix = "values must" if what == "values" else "must"
        if low is not None and any(v < low for v in values):
            bad(f"{prefix} be >= {low:g}{' when set' if is_optional(type(obj), f) else ''}, got {shown}")
        if above is not None and any(v <= above for v in values):
            bad(f"{prefix} be > {above:g}, got {shown}")
        if high is not None and any(v > high for v in values):
            bad(f"{prefix} be <= {high:g}, got {shown}")
        if meta.get("per_task") and isinstance(value, list) and n_tasks is not None and len(value) != n_tasks:
            bad(f"has {len(value)} values for {n_tasks} tasks")


@dataclass
class MethodOptions:
    """A method's own options: subclass it as a dataclass whose fields are `option(...)`s, and name it in the
    method's `Options`. Flags (`--name`), YAML keys and config.yaml use the fields' public names, which must be
    unique across the core options and every registered method."""

    def check(self, run) -> None:
        """Cross-option checks against the run's core configuration (`run`: RunConfig); raise NloraError."""

    def at(self, name: str, k: int):
        """Option `name`'s value for task k: its per-task list's entry where one is given, else the scalar."""
        per_task = next((f.name for f in option_fields(type(self)) if f.metadata.get("per_task_of") == name), None)
        values = getattr(self, per_task) if per_task else None
        return values[k] if values else getattr(self, name)

    @classmethod
    def keys(cls) -> list[str]:
        return [public_name(f.name) for f in option_fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "options") -> "MethodOptions":
        known = {f.name: f for f in option_fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = field_name(key)
            if name not in known:
                raise NloraError(f"{source}: unknown key {key!r} for these options; valid: {', '.join(cls.keys())}")
            kwargs[name] = coerce(cls, known[name], value, source)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {public_name(f.name): getattr(self, f.name) for f in option_fields(type(self))}

    def defaults(self) -> dict[str, Any]:
        return {public_name(f.name): default_of(f) for f in option_fields(type(self))}
