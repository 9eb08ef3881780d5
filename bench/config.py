"""Typed hyper-parameter dataclasses, their valid ranges, and the ``-o section.name.field=value`` overrides."""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from bench.errors import BenchError


class FieldError(ValueError):
    """A config field outside its valid range; ``build_config`` turns it into a one-line error
    that names the field as the user wrote it (``train.epochs``, ``defense.ft.lr``)."""

    def __init__(self, field: str, value: Any, valid: str) -> None:
        super().__init__(f"{field}={value!r}: must be {valid}")
        self.field, self.value, self.valid = field, value, valid


_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def _within(value: float, rule: str) -> bool:
    interval = _INTERVAL.match(rule)
    if interval:
        left, low, high, right = interval.groups()
        low_ok = value >= float(low) if left == "[" else value > float(low)
        high_ok = value <= float(high) if right == "]" else value < float(high)
        return low_ok and high_ok
    bound = _BOUND.match(rule)
    if bound is None:
        raise ValueError(f"bad range rule {rule!r}: write '>= 1', '> 0', '[0, 1)' or '(0, 1]'")
    op, limit = bound.group(1), float(bound.group(2))
    return {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]


def require(config: Any, **rules: str) -> None:
    """Check fields of a config against ranges written as '>= 1', '> 0', '[0, 1)' or '(0, 1]'.

    None passes (it means "the default"); a number must also be finite. Called from a config's
    ``__post_init__``, so an impossible recipe is refused when the grid is expanded, before
    any work starts."""
    for name, rule in rules.items():
        value = getattr(config, name)
        if value is None:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        valid = f"in {rule}" if rule[0] in "[(" else rule
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise FieldError(name, value, f"a number {valid}")
            if not math.isfinite(item):
                raise FieldError(name, value, f"a finite number {valid}")
            if not _within(item, rule):
                raise FieldError(name, value, valid)


def _coerce(text: str, annotation: Any, where: str) -> Any:
    """Turn an override's text into a value of the field's declared type."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise BenchError(f"bad override {where}={text!r}: expected one of {', '.join(map(str, choices))}")
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(get_args(annotation)):
            return None
        errors = []
        for option in options:
            try:
                return _coerce(text, option, where)
            except BenchError as exc:
                errors.append(str(exc))
        raise BenchError(errors[0] if errors else f"bad override {where}={text!r}")
    if origin in (tuple, list):
        inner = get_args(annotation)[0] if get_args(annotation) else str
        parts = [p for p in text.replace(";", ":").split(":") if p != ""]
        return origin(_coerce(p, inner, where) for p in parts)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise BenchError(f"bad override {where}={text!r}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise BenchError(f"bad override {where}={text!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise BenchError(f"bad override {where}={text!r}: expected a number") from None
    if annotation is str:
        return text
    raise BenchError(f"override {where} has a type ({annotation}) that cannot be set from the command line")


def field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def parse_field_values(config_cls: type, field: str, text: str, where: str) -> list[Any]:
    """Validate one override against ``config_cls``; a comma list gives a sweep."""
    types_by_name = field_types(config_cls)
    if field not in types_by_name:
        valid = ", ".join(sorted(types_by_name)) or "(none)"
        raise BenchError(f"unknown override {where}: {config_cls.__qualname__} has no field {field!r}; valid: {valid}")
    return [_coerce(part.strip(), types_by_name[field], where) for part in text.split(",")]


def build_config(config_cls: type, values: dict[str, Any], where: str = "") -> Any:
    """``config_cls(**values)``, or a one-line BenchError. ``where`` is the override prefix of
    the config's fields (``train.``, ``defense.ft.``), so the error names the field as the user
    would set it."""
    try:
        config = config_cls(**values)
    except FieldError as exc:
        raise BenchError(f"invalid {where}{exc}") from None
    except (TypeError, ValueError) as exc:
        raise BenchError(f"invalid {where.rstrip('.') or config_cls.__qualname__} settings: {exc}") from None
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BenchError(f"invalid {where}{field.name}={value!r}: must be a finite number")
    return config


def expand_sweeps(values_by_key: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of swept values: {'a': [1, 2], 'b': [3]} -> [{a:1,b:3}, {a:2,b:3}]."""
    if not values_by_key:
        return [{}]
    keys = list(values_by_key)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values_by_key[k] for k in keys))]


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise BenchError(f"bad override {text!r}: expected section.name.field=value, "
                         "e.g. defense.none.finetune_lr=1e-2")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()
