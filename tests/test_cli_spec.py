"""The parser snapshot behind fast help: current, equal to the real parser's help, and free of heavy imports."""

import argparse
import contextlib
import io
import json
import subprocess
import sys

import pytest

from convlora._cli_spec import load_spec, parser_from_spec, parser_spec, quick_parser
from convlora.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_the_committed_snapshot_is_the_current_parser():
    fresh = json.loads(json.dumps(parser_spec(build_parser())))
    assert load_spec() == fresh, "convlora/_cli_spec.json is stale: run `python tools/write_cli_spec.py`"


@pytest.mark.parametrize("columns", ["70", "140"])
def test_every_help_page_from_the_snapshot_is_the_real_one(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    real = dict(_parsers(build_parser()))
    quick = dict(_parsers(quick_parser()))
    assert set(real) == set(quick) and len(real) >= 12
    for path, parser in real.items():
        assert quick[path].format_help() == parser.format_help(), " ".join(path)
        assert quick[path].format_usage() == parser.format_usage(), " ".join(path)


def test_the_snapshot_round_trips_groups_exclusive_options_choices_and_nested_commands():
    parser = argparse.ArgumentParser(prog="tool", description="d")
    group = parser.add_argument_group("paths", "where things go")
    group.add_argument("--out", required=True, help="output (default: %(default)s)", default="x")
    one = parser.add_mutually_exclusive_group()
    one.add_argument("--fast", action="store_true")
    one.add_argument("--level", type=int, choices=[1, 2], default=1)
    parser.add_argument("--tag", action="append", metavar=("K", "V"), nargs=2)
    parser.add_argument("--flag", action=argparse.BooleanOptionalAction, default=True)
    sub = parser.add_subparsers(dest="command", metavar="CMD")
    run = sub.add_parser("run", help="run it")
    run.add_argument("files", nargs="+")
    copy = parser_from_spec(json.loads(json.dumps(parser_spec(parser))))
    assert copy.format_help() == parser.format_help()
    assert copy.format_help() != argparse.ArgumentParser(prog="tool").format_help()
    # the copy checks the shape of a command line as the original does; values stay text
    args = copy.parse_args(["--out", "o", "--level", "2", "run", "a", "b"])
    assert (args.out, args.level, args.command, args.files) == ("o", "2", "run", ["a", "b"])
    for bad in (["--level", "3", "--out", "o"], ["--fast", "--level", "1", "--out", "o"], []):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            copy.parse_args(bad)


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["benchmark", "run", "--help"], ["predict"], ["evaluate", "--bogus", "1"], []],
)
def test_help_and_usage_errors_import_neither_torch_nor_transformers_nor_peft(argv):
    code = f"""
import contextlib, io, json, sys
from convlora.cli import main
out, err = io.StringIO(), io.StringIO()
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main({argv!r})
except SystemExit as stop:
    status = stop.code
heavy = sorted(m for m in ("torch", "transformers", "peft", "numpy", "accelerate") if m in sys.modules)
print(json.dumps({{"status": status, "heavy": heavy, "out": out.getvalue(), "err": err.getvalue()}}))
"""
    result = _run(code)
    assert result["heavy"] == []
    if "--help" in argv:
        assert result["status"] == 0 and result["out"].startswith("usage: convlora")
    else:
        assert result["status"] == 2 and "usage: convlora" in result["out"] + result["err"]
        assert "error" in result["err"] or argv == []


def test_a_usage_error_reads_as_the_real_parser_says_it():
    def stderr_of(parse) -> str:
        err = io.StringIO()
        with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(err):
            parse()
        assert stop.value.code == 2
        return err.getvalue()

    argv = ["predict", "--model", "m", "--images", "i"]
    assert stderr_of(lambda: main(argv)) == stderr_of(lambda: build_parser().parse_args(argv))
    assert "the following arguments are required: --output" in stderr_of(lambda: main(argv))
