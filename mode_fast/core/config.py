"""A job's settings, declared once: each config field carries its flag, help and whether it
changes results; the argparse parser, the range checks and the run manifest's arguments are
generated from the fields.

    @dataclass(frozen=True)
    class ClusterConfig:
        out: Path = option(help="output folder", result=False, required=True)
        k: int = option(64, help="fine centers", result=True, low=1)

        def __post_init__(self) -> None:
            check_ranges(self)          # every low/high declared below, one message style

    add_arguments(parser, ClusterConfig)           # the CLI
    cfg = config_from_args(ClusterConfig, args)     # or ClusterConfig(...) from Python
    manifest_args(cfg)                              # {"--k": 64}: what run.json records

``result`` is True (recorded always), False (never: progress, paths of outputs, limits that
stop a run without changing its results) or ``ADDED`` (recorded only when not at the default:
an argument added after earlier run.json files were written, so those read as the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

from mode_fast.core.errors import ConfigError

ADDED: Literal["added"] = "added"
_KEY = "mode_fast"
_MISSING: Any = dataclasses.MISSING
_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()  # no cli_default given


@dataclasses.dataclass(frozen=True)
class Option:
    """What a field declares beyond its type and default (see the module docstring)."""

    help: str
    result: bool | Literal["added"]
    flag: str | None = None  # default: --field-name; a name without dashes is positional
    group: str | None = None  # the --help section
    low: float | None = None  # value >= low
    high: float | None = None  # value <= high (< high with high_open)
    high_open: bool = False
    cli_default: Any = _UNSET  # the parser's default when it differs from the field's (resolved later)
    exclusive: str | None = None  # fields naming the same one: at most one of their flags on a command line
    argparse: dict[str, Any] = dataclasses.field(default_factory=dict)  # nargs, metavar, choices, type, ...


def option(
    default: Any = _MISSING,
    *,
    help: str,  # noqa: A002 - argparse's name
    result: bool | Literal["added"],
    flag: str | None = None,
    group: str | None = None,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    cli_default: Any = _UNSET,
    exclusive: str | None = None,
    default_factory: Any = _MISSING,
    **argparse_kwargs: Any,
) -> Any:
    """A config field with its command-line flag (the module docstring says how it is used)."""
    meta = Option(help, result, flag, group, low, high, high_open, cli_default, exclusive, argparse_kwargs)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_KEY: meta})
    return dataclasses.field(default=default, metadata={_KEY: meta})


def options(cls: Any) -> list[tuple[dataclasses.Field, Option]]:
    """The declared fields of a config class (or instance), in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def flag_of(cls: Any, name: str) -> str:
    """The flag of field `name`, as the user types it (for error messages)."""
    for f, opt in options(cls):
        if f.name == name:
            return _flag(f, opt)
    raise KeyError(name)


def _flag(f: dataclasses.Field, opt: Option) -> str:
    return opt.flag or "--" + f.name.replace("_", "-")


def _arg_key(f: dataclasses.Field, opt: Option) -> str:
    """A field's key in run.json "args": its flag (``--baseline`` for a field ``baselines``
    declared with that flag). A positional's, and a negative switch's (``--no-balanced``
    storing ``balanced=False``), is ``--`` and the field's name: the manifest records the
    setting, not the switch that turns it off."""
    flag = _flag(f, opt)
    if not flag.startswith("-") or opt.argparse.get("action") == "store_false":
        return "--" + f.name.replace("_", "-")
    return flag


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, Path for `Path`, ...; None when argparse should keep strings."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) not in (tuple, list):
        annotation = args[0]
    return annotation if annotation in (int, float, Path) else None


def add_arguments(parser: argparse.ArgumentParser, cls: Any) -> None:
    """Add one argument per declared field of `cls`, grouped as declared; fields declaring
    the same `exclusive` name share one argparse mutually exclusive group (argparse then
    refuses two of them in one command line; the config checks it for Python callers)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, Any] = {None: parser}
    exclusive: dict[str, Any] = {}
    order = list(dict.fromkeys(opt.group for _, opt in options(cls)))
    # group by group, as --help shows them (the usage line too): a field may then be declared
    # where the manifest's order wants it, and still sit in its section
    for f, opt in sorted(options(cls), key=lambda fo: order.index(fo[1].group)):
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        target = groups[opt.group]
        if opt.exclusive is not None:
            if opt.exclusive not in exclusive:
                exclusive[opt.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[opt.exclusive]
        kwargs: dict[str, Any] = {"help": opt.help, **opt.argparse}
        flag = _flag(f, opt)
        positional = not flag.startswith("-")
        if hints[f.name] is bool and "action" not in kwargs:
            kwargs["action"] = "store_true"
        elif "type" not in kwargs and "action" not in kwargs and _base_type(hints[f.name]) is not None:
            kwargs["type"] = _base_type(hints[f.name])
        if not positional:
            kwargs["dest"] = f.name
            default = opt.cli_default if opt.cli_default is not _UNSET else f.default
            if default is _MISSING and f.default_factory is not _MISSING:
                default = f.default_factory()
            if default is _MISSING:
                kwargs["required"] = True
            elif kwargs.get("action") != "store_true" or default:
                kwargs["default"] = default
        target.add_argument(flag, **kwargs)


def config_from_args(cls: Any, args: argparse.Namespace, **resolved: Any) -> Any:
    """`cls` from parsed arguments; `resolved` overrides fields the job derives from several flags."""
    values = {f.name: getattr(args, f.name) for f, _ in options(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # frozen: no lists
    return cls(**{**values, **resolved})


def check_ranges(cfg: Any) -> None:
    """Every declared bound holds, and every float is finite (the CLI refuses inf/nan too;
    Python callers reach here). Raises ConfigError naming the flag."""
    for f, opt in options(cfg):
        value = getattr(cfg, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        flag = _flag(f, opt)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        if opt.high is not None:
            low = 0 if opt.low is None else opt.low
            inside = low <= value < opt.high if opt.high_open else low <= value <= opt.high
            if not inside:
                close = ")" if opt.high_open else "]"
                raise ConfigError(f"{flag} must be in [{low:g}, {opt.high:g}{close}, got {value}")
        elif opt.low is not None and value < opt.low:
            raise ConfigError(f"{flag} must be >= {opt.low:g}, got {value}")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # Paths -> str, tuples -> lists


def result_values(cfg: Any) -> dict[str, Any]:
    """field name -> value (JSON) of the result-changing fields, in declaration order, then the
    ``ADDED`` ones not at their default (after the others, where a record written before they
    existed had them appended)."""
    out = {}
    for f, opt in options(cfg):
        if opt.result is True:
            out[f.name] = _json(getattr(cfg, f.name))
    for f, opt in options(cfg):
        value = getattr(cfg, f.name)
        if opt.result == ADDED and value != f.default:
            out[f.name] = _json(value)
    return out


def manifest_args(cfg: Any, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """flag -> value: the arguments run.json records (`values`: result_values, maybe with a
    job's derived entries, keyed by field name; a derived entry's key is ``--`` and its name)."""
    values = result_values(cfg) if values is None else values
    keys = {f.name: _arg_key(f, opt) for f, opt in options(cfg)}
    return {keys.get(name, "--" + name.replace("_", "-")): value for name, value in values.items()}


def added_defaults(cls: Any) -> dict[str, Any]:
    """flag -> default of the ``ADDED`` fields (RunState.open's `defaults`)."""
    return {_arg_key(f, opt): _json(f.default) for f, opt in options(cls) if opt.result == ADDED}


def result_flags(cls: Any) -> set[str]:
    """The manifest keys a config's result-changing fields produce (tests check run.json against it)."""
    return {_arg_key(f, opt) for f, opt in options(cls) if opt.result}
