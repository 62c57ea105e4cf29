"""A snapshot of the ``convlora`` command's argument parser, so that ``--help`` and usage errors answer at once.

Building the real parser needs the training configuration's field metadata, the synthetic domains and the
benchmark's options, and with them torch, transformers and PEFT: seconds before the first line of help. The
snapshot (``_cli_spec.json`` beside this file) holds what argparse needs to print help and to check the shape
of a command line (options, choices, nargs, required, groups, help text), nothing to run it. ``convlora.cli``
parses every command line with the snapshot first (help and usage errors end there, in a fraction of a
second, importing only the standard library) and then with the real parser, which converts the values.

The snapshot is written from the real parser (``python tools/write_cli_spec.py``) and a test checks that it
is current and that every help page built from it is the real one, character for character.

>>> import argparse
>>> parser = argparse.ArgumentParser(prog="demo")
>>> _ = parser.add_argument("--size", type=int, default=3, help="side in pixels")
>>> parser_from_spec(parser_spec(parser)).format_help() == parser.format_help()
True
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPEC_FILE = Path(__file__).with_name("_cli_spec.json")

# argparse's action classes by the name their ``action=`` argument takes
_ACTIONS: dict[type, str] = {
    argparse._StoreAction: "store",
    argparse._StoreConstAction: "store_const",
    argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false",
    argparse._AppendAction: "append",
    argparse._AppendConstAction: "append_const",
    argparse._CountAction: "count",
    argparse._ExtendAction: "extend",
    argparse.BooleanOptionalAction: "boolean_optional",
}
# what each action accepts besides option strings, dest, help, required and metavar
_TAKES = {
    "store": ("nargs", "default", "choices"),
    "append": ("nargs", "default", "choices"),
    "extend": ("nargs", "default", "choices"),
    "store_const": ("const", "default"),
    "append_const": ("const", "default"),
    "store_true": ("default",),
    "store_false": ("default",),
    "count": ("default",),
    "boolean_optional": ("default",),
}


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it; anything else as its text, which is all that help shows of it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _action_spec(action: argparse.Action) -> dict[str, Any]:
    if isinstance(action, argparse._SubParsersAction):
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        return {
            "action": "parsers",
            "dest": action.dest,
            "required": action.required,
            "metavar": action.metavar,
            "help": action.help,
            "parsers": {name: {"help": helps.get(name), **parser_spec(sub)} for name, sub in action.choices.items()},
        }
    kind = _ACTIONS.get(type(action))
    if kind is None:
        raise TypeError(f"the CLI snapshot cannot describe argparse action {type(action).__name__} ({action.dest})")
    spec = {
        "action": kind,
        "option_strings": list(action.option_strings),
        "dest": action.dest,
        "help": action.help,
        "required": action.required,
        "metavar": list(action.metavar) if isinstance(action.metavar, tuple) else action.metavar,
    }
    for key in _TAKES[kind]:
        spec[key] = _plain(getattr(action, key))
    if spec.get("choices") is not None:  # compared with the unconverted text of the command line
        spec["choices"] = [str(choice) for choice in spec["choices"]]
    return spec


def parser_spec(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """What ``parser`` says and accepts, as JSON-ready data (its subcommands' parsers included).

    Args:
        parser: an argument parser built with argparse's own actions.
    """
    index = {id(action): i for i, action in enumerate(parser._actions)}
    return {
        "prog": parser.prog,
        "usage": parser.usage,
        "description": parser.description,
        "epilog": parser.epilog,
        "allow_abbrev": parser.allow_abbrev,
        "add_help": parser.add_help,
        "groups": [
            {
                "title": group.title,
                "description": group.description,
                "actions": [index[id(a)] for a in group._group_actions],
            }
            for group in parser._action_groups
        ],
        "exclusive": [
            {"required": group.required, "actions": [index[id(a)] for a in group._group_actions]}
            for group in parser._mutually_exclusive_groups
        ],
        "actions": [None if isinstance(a, argparse._HelpAction) else _action_spec(a) for a in parser._actions],
    }


def _add(target: Any, spec: dict[str, Any]) -> argparse.Action:
    kind = spec["action"]
    kwargs: dict[str, Any] = {"dest": spec["dest"], "help": spec["help"], "required": spec["required"]}
    if spec["metavar"] is not None:
        kwargs["metavar"] = tuple(spec["metavar"]) if isinstance(spec["metavar"], list) else spec["metavar"]
    for key in _TAKES[kind]:
        if spec[key] is not None or key in ("default",):
            kwargs[key] = spec[key]
    if not spec["option_strings"]:  # a positional: argparse takes its dest as the name and no required=
        del kwargs["dest"], kwargs["required"]
        return target.add_argument(spec["dest"], **kwargs)
    if kind == "boolean_optional":  # it adds the --no- forms itself
        names = [o for o in spec["option_strings"] if not o.startswith("--no-")]
        return target.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
    return target.add_argument(*spec["option_strings"], action=kind, **kwargs)


def parser_from_spec(spec: dict[str, Any]) -> argparse.ArgumentParser:
    """An argument parser that prints the same help and accepts the same command lines as the one ``spec`` describes.

    Values are not converted (no ``type=``): the parser checks the shape of a command line, not its values.

    Args:
        spec: what :func:`parser_spec` returned.
    """
    parser = argparse.ArgumentParser(**_parser_kwargs(spec))
    _populate(parser, spec)
    return parser


def _parser_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    keys = ("prog", "usage", "description", "epilog", "allow_abbrev", "add_help")
    return {key: spec[key] for key in keys}


def _populate(parser: argparse.ArgumentParser, spec: dict[str, Any]) -> None:
    """Give the new parser ``parser`` the groups, actions and subcommands of ``spec``."""
    default_titles = [g.title for g in parser._action_groups]
    groups: dict[int, Any] = {}
    for i, group in enumerate(spec["groups"]):
        if i < len(default_titles) and group["title"] == default_titles[i]:
            target = parser._action_groups[i]
        else:
            target = parser.add_argument_group(group["title"], group["description"])
        for index in group["actions"]:
            groups[index] = target
    exclusive: dict[int, Any] = {}
    for group in spec["exclusive"]:
        made = None
        for index in group["actions"]:
            made = made or groups[index].add_mutually_exclusive_group(required=group["required"])
            exclusive[index] = made
    for index, action in enumerate(spec["actions"]):
        if action is None:  # -h/--help: argparse adds its own
            continue
        target = exclusive.get(index, groups[index])
        if action["action"] != "parsers":
            _add(target, action)
            continue
        sub = parser.add_subparsers(dest=action["dest"], required=action["required"], metavar=action["metavar"])
        sub.help = action["help"]
        for name, child in action["parsers"].items():
            kwargs = _parser_kwargs(child)
            _populate(sub.add_parser(name, help=child["help"], **kwargs), child)


def load_spec() -> dict[str, Any]:
    """The committed snapshot of the ``convlora`` parser."""
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


def quick_parser() -> argparse.ArgumentParser:
    """The ``convlora`` parser built from the snapshot: help and usage checks without importing torch."""
    return parser_from_spec(load_spec())
