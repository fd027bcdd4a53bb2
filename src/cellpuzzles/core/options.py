"""Option dataclasses are the one source of every default: each field holds its default and
help text once (``option(default, help)``); the CLI's flags are derived from the fields
(``add_arguments``) and the pipeline's parameter defaults read them, so the library, the CLI
and the pipeline cannot disagree. ``None`` means "not set" (the field's documented fallback)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from cellpuzzles.core.errors import CellPuzzlesError


def option(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, choices=None,
           default_factory=dataclasses.MISSING):
    """A dataclass field with its CLI help (and optionally its flag name and choices)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """(python type, optional?) of an annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def defaults(cls) -> dict:
    """Field name -> default value of an options dataclass."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def add_arguments(parser: argparse.ArgumentParser, cls, only=None, skip=(), required=()) -> None:
    """Add one flag per field of ``cls`` (``--field-name``, or the field's ``flag``): type,
    default and help from the field; booleans as --x/--no-x; lists repeatable."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip or not f.metadata.get("help"):
            continue
        tp, _ = _base_type(hints[f.name])
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "help": f.metadata["help"]}
        if f.name in required or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            kw["required"] = True
        else:
            kw["default"] = defaults(cls)[f.name]
            if kw["default"] is not None and tp is not bool:
                kw["help"] += f" (default: {kw['default']})"
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list or tp is list:
            kw["action"] = "append"
            kw["default"] = []
        else:
            kw["type"] = tp if tp in (int, float, str) else str
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def from_args(cls, ns: argparse.Namespace, **overrides):
    """An options object from parsed arguments: the fields the parser had, plus overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(ns).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def build(cls, values: dict, **fixed):
    """An options object from a mapping that crossed a JSON/protobuf boundary (a pipeline's
    dict parameter: every number arrives as a float): values are cast to the fields' types;
    an unknown field is a one-line error naming it."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CellPuzzlesError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kw = {}
    for key, value in {**values, **fixed}.items():
        tp, _ = _base_type(hints[key])
        if value is not None and tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        kw[key] = value
    return cls(**kw)


def parse_key_value(text: str, flag: str, example: str = "KEY=VALUE", json_values: bool = False,
                    form: str = "KEY=VALUE") -> tuple[str, object]:
    """``KEY=VALUE`` from a repeatable flag; with ``json_values`` the value is read as JSON
    when it parses (numbers, booleans), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CellPuzzlesError(f"{flag} {text!r}: expected {form}, e.g. {flag} {example}")
    key, value = key.strip(), value.strip()
    if json_values:
        try:
            return key, json.loads(value)
        except json.JSONDecodeError:
            return key, value
    return key, value
