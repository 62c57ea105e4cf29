"""The documentation site: its code runs, its references cover the code, and it builds without a warning.

- Every fenced ``python`` block of ``docs/**/*.md`` runs, each page's blocks in order in one namespace, in
  a fresh temporary directory. A block right after a ``<!-- no-test -->`` line is skipped (only for code
  that needs a real SAM download or a GPU).
- Every ``convlora ...`` / ``accelerate launch -m convlora ...`` / ``python examples/X.py ...`` line of a
  ``bash`` block parses with the real argument parsers, and every ``--field`` it passes to ``train`` is a
  configuration field.
- The generated CLI reference names every subcommand and option of ``convlora.cli.build_parser()``; the
  configuration reference names every config field with a description; the API reference documents every
  name the packages export.
- ``mkdocs build --strict`` succeeds (skipped when the documentation tools are not installed; the ``dev``
  extra installs them).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.S | re.M)
CONFIG_CLASSES = (
    "convlora.tuner.config.ConvLoraConfig",
    "convlora.training.config.TrainConfig",
    "convlora.data.transforms.AugmentConfig",
)


class Block(NamedTuple):
    page: Path
    line: int
    lang: str
    code: str
    skipped: bool


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == NO_TEST
        line = text.count("\n", 0, match.start()) + 2
        code = textwrap.dedent(match.group("body"))
        found.append(Block(page, line, match.group("lang"), code, skipped))
    return found


def python_pages() -> list[Path]:
    return [p for p in pages() if any(b.lang == "python" and not b.skipped for b in blocks(p))]


def embedded_model_available() -> bool:
    from convlora.models.embedded import embedded_path

    try:
        embedded_path("convlora-tiny")
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------ code examples


@pytest.mark.slow
@pytest.mark.parametrize("page", python_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_python_examples_of_a_page_run_in_order(page, tmp_path, monkeypatch):
    runnable = [b for b in blocks(page) if b.lang == "python" and not b.skipped]
    if any("convlora-tiny" in b.code for b in runnable) and not embedded_model_available():
        pytest.skip("this page's code uses the embedded convlora-tiny model, which this checkout does not have yet")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in runnable:
        where = f"{page.relative_to(ROOT)}:{block.line}"
        exec(compile(block.code, where, "exec"), namespace)  # a failure's traceback names the page and line


def test_no_test_marker_is_rare_and_only_on_python_blocks():
    skipped = [b for p in pages() for b in blocks(p) if b.skipped]
    for block in skipped:
        assert block.lang == "python", f"{block.page}:{block.line}: <!-- no-test --> only applies to python blocks"
    runnable = [b for p in pages() for b in blocks(p) if b.lang == "python" and not b.skipped]
    assert len(skipped) < len(runnable) / 2, "most examples must run"


# ------------------------------------------------------------------------------------ shell commands


def shell_commands() -> list[tuple[str, list[str]]]:
    """``(where, tokens)`` of every command line in the docs' bash blocks (continuations joined)."""
    commands = []
    for page in pages():
        for block in blocks(page):
            if block.lang not in ("bash", "sh", "console"):
                continue
            text = block.code.replace("\\\n", " ")
            for offset, line in enumerate(text.splitlines()):
                tokens = shlex.split(line, comments=True)
                if tokens:
                    commands.append((f"{page.relative_to(ROOT)}:{block.line + offset}", tokens))
    return commands


def convlora_arguments(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``("convlora", args)`` or ``("example:<domain>", args)`` for a command that runs convlora, else None."""
    while tokens and re.fullmatch(r"\w+=\S*", tokens[0]):  # leading VAR=value assignments
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "convlora":
        return "convlora", tokens[1:]
    for index in range(len(tokens) - 1):
        if tokens[index] == "-m" and tokens[index + 1] == "convlora":
            return "convlora", tokens[index + 2 :]
    for index, token in enumerate(tokens):
        match = re.fullmatch(r"examples/(\w+)\.py", token)
        if match:
            return f"example:{match.group(1)}", tokens[index + 1 :]
    return None


def check_training_overrides(where: str, extra: list[str]) -> None:
    from convlora.data import AugmentConfig
    from convlora.training.config import TrainConfig
    from convlora.tuner.config import ConvLoraConfig

    nested = {"conv_lora": ConvLoraConfig, "augment": AugmentConfig}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for token in extra:
        if not token.startswith("--"):
            continue
        key = token[2:].split("=", 1)[0].replace("-", "_")
        root, _, inner = key.partition(".")
        assert root in known, f"{where}: --{key} is not a training configuration field"
        if inner:
            assert root in nested, f"{where}: --{key}: {root} has no nested fields"
            fields = {f.name for f in dataclasses.fields(nested[root])}
            assert inner in fields, f"{where}: --{key}: {inner} is not a field of {nested[root].__name__}"


def test_every_command_line_in_the_docs_parses():
    from convlora.cli import _TAKES_OVERRIDES, build_parser
    from convlora.examples import build_parser as example_parser
    from convlora.recipes import RECIPES

    checked = 0
    for where, tokens in shell_commands():
        found = convlora_arguments(tokens)
        if found is None:
            continue
        program, argv = found
        if "-h" in argv or "--help" in argv:
            continue
        if program.startswith("example:"):
            name = program.split(":", 1)[1]
            if name not in RECIPES:  # a standalone example with options of its own (examples/nuclei.py)
                assert (ROOT / "examples" / f"{name}.py").is_file(), f"{where}: no examples/{name}.py"
                checked += 1
                continue
            parser = example_parser(name)
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: {shlex.join(tokens)} does not parse")
        else:
            parser = build_parser()
            try:
                args, extra = parser.parse_known_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: {shlex.join(tokens)} does not parse")
            # `convlora benchmark ...` goes to convlora.bench's own entry point, which this parser describes
            runs = getattr(args, "handler", None) is not None or getattr(args, "benchmark_command", None)
            assert runs, f"{where}: no subcommand in {shlex.join(tokens)}"
            if extra:
                assert args.command in _TAKES_OVERRIDES, f"{where}: unknown arguments {extra}"
                check_training_overrides(where, extra)
        checked += 1
    assert checked >= 10


def test_every_toml_config_in_the_docs_is_a_valid_training_config(tmp_path):
    pytest.importorskip("tomllib", reason="TOML configs need Python 3.11 or newer (tomllib)")
    from convlora.training.config import load_config

    found = [b for p in pages() for b in blocks(p) if b.lang == "toml"]
    assert found
    for block in found:
        path = tmp_path / "run.toml"
        path.write_text(block.code)
        config = load_config(path)  # raises ValueError naming the field on anything invalid
        assert config.data, f"{block.page}:{block.line}"


# -------------------------------------------------------------------------------- generated reference


def subcommands(parser: argparse.ArgumentParser, prefix: str = "convlora"):
    """``(full name, parser)`` of every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def test_cli_reference_names_every_subcommand_and_option():
    from convlora.cli import build_parser
    from convlora.training.config import TrainConfig

    markdown = load_hooks().cli_markdown()
    found = list(subcommands(build_parser()))
    assert found
    for title, parser in found:
        heading = re.search(rf"^#+ `{re.escape(title)}`$", markdown, re.M)
        assert heading, f"{title} missing from the CLI reference"
        following = re.search(r"^#+ ", markdown[heading.end() :], re.M)
        section = markdown[heading.end() : heading.end() + following.start() if following else None]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            for option in action.option_strings or [action.dest]:
                assert f"`{option}`" in section, f"{title}: {option} missing from its section of the CLI reference"
    for field in dataclasses.fields(TrainConfig):
        assert f"`--{field.name}`" in markdown
    assert "<!-- generated:cli -->" in (DOCS / "reference" / "cli.md").read_text()


@pytest.mark.parametrize("path", CONFIG_CLASSES)
def test_configuration_reference_describes_every_field(path):
    hooks = load_hooks()
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    markdown = hooks.config_markdown(path)
    described = hooks.docstring_args(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        assert f"| `{field.name}` |" in markdown, f"{path}.{field.name} missing"
    own = [f for f in dataclasses.fields(cls) if f.init and f.name in cls.__annotations__]
    undocumented = [f.name for f in own if not (described.get(f.name) or f.metadata.get("help"))]
    assert not undocumented, f"{path}: fields without a description: {undocumented}"
    assert f"<!-- generated:config {path} -->" in (DOCS / "reference" / "config.md").read_text()


def documented_targets() -> set[str]:
    targets = set()
    for page in (DOCS / "reference" / "api").glob("*.md"):
        targets |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    return targets


@pytest.mark.parametrize("package", ["convlora", "convlora.data", "convlora.synthetic"])
def test_api_reference_documents_every_exported_name(package):
    module = importlib.import_module(package)
    targets = documented_targets()
    modules = {t: importlib.import_module(t) for t in targets if _is_module(t)}
    missing = []
    for name in module.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(module, name)
        candidates = {f"{package}.{name}"}
        if hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
            candidates.add(f"{obj.__module__}.{obj.__qualname__}")
        if candidates & targets:
            continue
        if any(getattr(m, name, None) is obj for m in modules.values()):
            continue
        if any(t.endswith(f".{name}") and _resolve(t) is obj for t in targets):  # constants, by identity
            continue
        missing.append(name)
    assert not missing, f"{package} exports names without API reference: {missing}"


def _resolve(target: str) -> object:
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _is_module(target: str) -> bool:
    try:
        return importlib.util.find_spec(target) is not None
    except (ImportError, ValueError):
        return False


def test_benchmark_page_says_so_when_no_results_are_committed(tmp_path):
    markdown = load_hooks().benchmarks_markdown(tmp_path)
    assert "No benchmark results are committed yet" in markdown


def test_benchmark_page_renders_committed_results_with_their_machine(tmp_path):
    result = {
        "experiment": {"name": "cost", "kind": "cost", "description": "what each method costs"},
        "environment": {"machine": {"cpu": "Test CPU 9000", "cores": 2}, "threads": 1, "versions": {"torch": "2.13"}},
        "command": "python -m convlora.bench run benchmarks/configs/cost.json",
        "runs": [{"method": "lora", "step_seconds": 0.25}, {"method": "conv_lora", "step_seconds": 0.5}],
    }
    (tmp_path / "cost.json").write_text(json.dumps(result))
    markdown = load_hooks().benchmarks_markdown(tmp_path)
    assert "Test CPU 9000" in markdown and "python -m convlora.bench run" in markdown
    assert "| method | step_seconds |" in markdown and "| conv_lora | 0.5 |" in markdown


def test_benchmark_page_renders_every_committed_result():
    hooks = load_hooks()
    files = sorted(hooks.RESULTS_DIR.glob("*.json"))
    if not files:
        pytest.skip("no benchmark results are committed yet (the page then says so, see the test above)")
    markdown = hooks.benchmarks_markdown(hooks.RESULTS_DIR, set(hooks.benchmark_plots()))
    for path in files:
        name = json.loads(path.read_text()).get("name") or path.stem
        assert f"## {name}" in markdown, f"{path.name} is not on the benchmark page"


def test_embedded_model_record_is_rendered_with_its_machine(monkeypatch):
    import convlora.models.embedded

    record = {
        "parameters": 1234567,
        "architecture": {"image_size": 128, "num_hidden_layers": 4, "hidden_size": 96, "patch_size": 8,
                         "window_size": 8, "global_attn_indexes": [1, 3]},
        "corpus": "generic shapes",
        "steps": 100,
        "images_seen": 800,
        "wall_time_s": 600.0,
        "machine": {"cpu": "Test CPU 9000", "torch_threads": 2, "torch": "2.13"},
        "command": "python -m convlora.pretrain --out x",
        "held_out": {"images": 64, "foreground_iou": 0.75},
    }  # fmt: skip
    monkeypatch.setattr(convlora.models.embedded, "embedded_info", lambda name: record)
    markdown = load_hooks().embedded_model_markdown()
    assert "1,234,567" in markdown and "Test CPU 9000" in markdown and "foreground_iou 0.750" in markdown


def test_markers_are_all_known_and_the_figure_is_used():
    hooks = load_hooks()
    for page in pages():
        for name, _ in hooks.MARKER.findall(page.read_text()):
            assert name in hooks.GENERATORS, f"{page}: unknown marker generated:{name}"
    assert (DOCS / "assets" / "conv-lora.svg").is_file()
    assert "assets/conv-lora.svg" in (DOCS / "concepts" / "conv-lora.md").read_text()


# ------------------------------------------------------------------------------------------- the site


def docs_tools_missing() -> list[str]:
    return [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
            if not _is_module(name)]  # fmt: skip


@pytest.mark.slow
def test_site_builds_strictly_without_warnings(tmp_path):
    missing = docs_tools_missing()
    if missing:
        pytest.skip(f"documentation tools not installed ({', '.join(missing)}); `pip install -e '.[dev]'` adds them")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "WARNING" not in output, output[-4000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "convlora train" in cli and "--conv_lora.r" in cli
    assert "ConvLoraConfig" in (site / "reference" / "api" / "method" / "index.html").read_text()
    assert "vit-h" in (site / "concepts" / "conv-lora" / "index.html").read_text()
