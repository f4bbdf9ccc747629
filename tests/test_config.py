"""core.config: a field declares its flag once; parser, range checks and manifest come from it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from mode_fast.core.config import (
    ADDED,
    add_arguments,
    added_defaults,
    check_ranges,
    config_from_args,
    flag_of,
    manifest_args,
    option,
    result_flags,
)
from mode_fast.core.errors import ConfigError


@dataclass(frozen=True)
class Probe:
    data: tuple[str, ...] = option(help="inputs", result=True, flag="data", nargs="+")
    out: Path = option(help="output folder", result=False)
    k: int = option(8, help="centers", result=True, low=1, group="fit")
    share: float = option(0.5, help="a share", result=True, high=1.0, group="fit")
    drop: float | None = option(None, help="dropout", result=True, high=1.0, high_open=True)
    fast: bool = option(False, help="a switch", result=ADDED)
    note: str | None = option(None, help="not result-changing", result=False, metavar="TEXT")

    def __post_init__(self) -> None:
        check_ranges(self)


def parse(*argv: str) -> Probe:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Probe)
    return config_from_args(Probe, parser.parse_args(list(argv)))


def test_parser_types_defaults_and_required_come_from_the_fields(tmp_path):
    cfg = parse("a", "b", "--out", str(tmp_path), "--k", "3", "--fast")
    assert cfg == Probe(data=("a", "b"), out=tmp_path, k=3, fast=True)
    assert isinstance(cfg.out, Path) and isinstance(cfg.k, int)
    with pytest.raises(SystemExit):
        parse("a")  # --out is required: the field has no default


def test_manifest_holds_the_result_fields_in_order_and_added_ones_only_when_changed(tmp_path):
    cfg = parse("a", "--out", str(tmp_path))
    assert manifest_args(cfg) == {"--data": ["a"], "--k": 8, "--share": 0.5, "--drop": None}
    assert list(manifest_args(cfg)) == ["--data", "--k", "--share", "--drop"]
    assert manifest_args(parse("a", "--out", str(tmp_path), "--fast"))["--fast"] is True
    assert added_defaults(Probe) == {"--fast": False}
    assert result_flags(Probe) == {"--data", "--k", "--share", "--drop", "--fast"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["--share", "1.5"], r"--share must be in \[0, 1\], got 1.5"),
        (["--drop", "1.0"], r"--drop must be in \[0, 1\), got 1.0"),
        (["--share", "nan"], "--share must be a finite number, got nan"),
    ],
)
def test_declared_bounds_are_checked_with_the_flag_named(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse("a", "--out", str(tmp_path), *argv)


def test_flag_of_names_positionals_and_options():
    assert flag_of(Probe, "data") == "data"
    assert flag_of(Probe, "note") == "--note"


@dataclass(frozen=True)
class Renamed:
    baselines: tuple[str, ...] = option((), help="models", result=True, flag="--baseline", action="append")
    extra: int = option(0, help="added later", result=ADDED, flag="--more")


def test_manifest_keys_are_the_declared_flags_not_the_field_names():
    cfg = Renamed(baselines=("a",), extra=2)
    assert manifest_args(cfg) == {"--baseline": ["a"], "--more": 2}
    assert manifest_args(cfg, {"baselines": ["a"], "global_batch": 8}) == {"--baseline": ["a"], "--global-batch": 8}
    assert result_flags(Renamed) == {"--baseline", "--more"}
    assert added_defaults(Renamed) == {"--more": 0}


@dataclass(frozen=True)
class Either:
    t: float | None = option(None, help="a threshold", result=True, exclusive="size")
    target_size: int | None = option(None, help="a size", result=True, exclusive="size")
    estimate_only: bool = option(False, help="count only", result=True, flag="--estimate")


def test_exclusive_fields_share_one_group_and_manifest_keys_are_the_declared_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Either)
    with pytest.raises(SystemExit):
        parser.parse_args(["--t", "1", "--target-size", "2"])  # argparse: not allowed with --t
    cfg = config_from_args(Either, parser.parse_args(["--target-size", "2", "--estimate"]))
    assert cfg == Either(target_size=2, estimate_only=True)
    assert manifest_args(cfg) == {"--t": None, "--target-size": 2, "--estimate": True}
    assert manifest_args(cfg, {"estimate_only": True, "derived_value": 1}) == {"--estimate": True, "--derived-value": 1}
    assert result_flags(Either) == {"--t", "--target-size", "--estimate"}


@dataclass(frozen=True)
class Late:
    """A config whose manifest order differs from its --help order: `late` was added after
    the others (ADDED), `c` sits in group "a" but is declared after group "b"."""

    late: bool = option(False, help="added later", result=ADDED, group="a")
    a: int = option(1, help="first of a", result=True, group="a")
    b: int = option(2, help="the only one of b", result=True, group="b")
    c: int = option(3, help="second of a", result=True, group="a")


def test_added_fields_come_last_in_the_manifest_and_the_parser_goes_group_by_group():
    assert list(manifest_args(Late(late=True))) == ["--a", "--b", "--c", "--late"]
    parser = argparse.ArgumentParser()
    add_arguments(parser, Late)
    assert [a.dest for a in parser._actions if a.dest != "help"] == ["late", "a", "c", "b"]
    assert parser.format_usage().index("--c") < parser.format_usage().index("--b")
    assert [[a.dest for a in g._group_actions] for g in parser._action_groups[2:]] == [["late", "a", "c"], ["b"]]


@dataclass(frozen=True)
class Negated:
    balanced: bool = option(True, help="plain k-means", result=True, flag="--no-balanced", action="store_false")


def test_a_negative_switch_records_the_setting_under_the_fields_name():
    """run.json of 0.1 holds "--balanced": true/false; the switch that turns it off is the flag."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, Negated)
    cfg = config_from_args(Negated, parser.parse_args(["--no-balanced"]))
    assert manifest_args(cfg) == {"--balanced": False}
    assert manifest_args(Negated()) == {"--balanced": True}
    assert result_flags(Negated) == {"--balanced"}
