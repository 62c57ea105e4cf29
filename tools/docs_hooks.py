"""MkDocs hooks: the parts of the documentation that are generated from the code and from committed data.

A page asks for generated content with a marker on a line of its own, replaced when the page is built::

    <!-- generated:cli -->                        every subcommand and option of convlora.cli.build_parser()
    <!-- generated:config convlora.TrainConfig --> the fields of a config dataclass, with types and defaults
    <!-- generated:parameter-counts -->           LoRA vs Conv-LoRA parameter counts on SAM ViT-B/L/H
    <!-- generated:rank-table -->                 adapter size against the rank on SAM ViT-B
    <!-- generated:domains -->                    the domain recipes and their example scripts
    <!-- generated:embedded-model -->             the pretraining record of the embedded base model
    <!-- generated:benchmarks -->                 the committed results in benchmarks/results/*.json

An unknown marker stops the build. ``docs/robustness.md`` is written by the robustness work; until it
lands, a placeholder page is generated so that links to it resolve. The generator functions are plain
Python with no MkDocs import at module level, so tests/test_docs.py calls them directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# CONVLORA_BENCHMARK_RESULTS points the benchmark page at another folder of results (to preview them).
RESULTS_DIR = Path(os.environ.get("CONVLORA_BENCHMARK_RESULTS", ROOT / "benchmarks" / "results"))
MARKER = re.compile(r"^<!-- generated:([a-z-]+)(?: ([^ ]+))? -->$", re.MULTILINE)
ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):`~?([^`]+)`")

ROBUSTNESS_PLACEHOLDER = """# Robustness

This page describes how convlora behaves on bad input, interrupted runs and unusual data. It is written
alongside the robustness tests (`tests/test_robustness.py`) and has not landed in this checkout yet.

Meanwhile: [Preparing a dataset](guides/datasets.md) lists every problem `convlora inspect` reports, and
the [FAQ](faq.md) covers the common failures.
"""


# --------------------------------------------------------------------------------------------- CLI


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every subcommand, in the order ``convlora --help`` lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


def _help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    try:
        text = text % {"default": action.default, "prog": prog}
    except (KeyError, TypeError, ValueError):
        text = text.replace("%%", "%")
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.nargs in ("+", "*"):
        return f"`{metavar}` ..."
    return f"`{metavar}`"


def _default(action: argparse.Action) -> str:
    field_default = getattr(action, "field_default", None)  # a config field's option (convlora train)
    if field_default is not None:
        text = field_default.removeprefix("default: ")
        return "unset" if text == "unset" else ("required" if text == "required" else f"`{text}`")
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    if isinstance(action.default, list):
        return " ".join(f"`{v}`" for v in action.default)
    return f"`{action.default}`"


def cli_markdown() -> str:
    """Markdown reference of the ``convlora`` command: every subcommand, argument and option."""
    from convlora.cli import build_parser

    parser = build_parser()
    out = [
        "## `convlora`",
        "",
        _cell(parser.description or ""),
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
        "| subcommand | what it does |",
        "|---|---|",
    ]
    commands = _subcommands(parser)
    out += [f"| [`{name}`](#convlora-{name}) | {_cell(text)} |" for name, text, _ in commands]
    for name, text, sub in commands:
        out += _command_section(f"convlora {name}", text, sub, level=2)
    return "\n".join(out)


def _command_section(title: str, text: str, sub: argparse.ArgumentParser, level: int) -> list[str]:
    """One subcommand: summary, description, usage, a table of its arguments; nested subcommands below."""
    from convlora.cli import _TAKES_OVERRIDES
    from convlora.training.config import TrainConfig

    out = ["", f"{'#' * level} `{title}`", ""]
    if text:
        out += [f"{text[:1].upper()}{text[1:]}.", ""]
    if sub.description:
        out += [sub.description, ""]
    out += ["```text", sub.format_usage().strip(), "```", ""]
    nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    groups = [(g.title, [a for a in g._group_actions if not isinstance(a, skip)]) for g in sub._action_groups]
    groups = [(title, actions) for title, actions in groups if actions]
    for title, actions in groups:
        if len(groups) > 1 and title not in ("options", "optional arguments", "positional arguments"):
            out += [f"**{title}**", ""]
        out += ["| argument | value | default | description |", "|---|---|---|---|"]
        for action in actions:
            names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            help_text = _cell(getattr(action, "field_help", None) or _help_text(action, sub.prog))
            out.append(f"| {names} | {_value(action)} | {_default(action)} | {help_text} |")
        out.append("")
    if sub.prog.split()[-1] in _TAKES_OVERRIDES:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        listed = {o.removeprefix("--") for _, actions in groups for a in actions for o in a.option_strings}
        out += [
            "Every field of the training configuration is an option: `--FIELD VALUE`, or `--FIELD=VALUE`",
            "(the settings tables above, generated from the field metadata of `TrainConfig`); nested fields use a",
            "dot (`--conv_lora.r 4`, `--augment.hflip 0`). Values are read as JSON where they parse (numbers,",
            "`true`, `null`, lists such as `[0, 1]`) and as text otherwise. Command-line values override the",
            "`--config` file. More on each field in [Configuration](config.md#trainconfig).",
            "",
        ]
        unlisted = sorted(fields - listed)
        if unlisted:
            out += ["| field | description |", "|---|---|"]
            described = docstring_args(TrainConfig)
            for name in unlisted:
                out.append(f"| `--{name}` | {_cell(_first_sentence(described.get(name, '')))} |")
            out.append("")
    for action in nested:
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, parser in action.choices.items():
            out += _command_section(f"{title} {name}", helps.get(name, ""), parser, level=level + 1)
    return out


def _first_sentence(text: str) -> str:
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    sentence = text[: match.start()] if match else text
    return sentence.strip() + "." if sentence.strip() else ""


# ------------------------------------------------------------------------------------------ configs


def docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a class docstring, one line of text per name (reST roles as code)."""
    doc = inspect.getdoc(cls) or ""
    args: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return args
    base: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        base = indent if base is None else base
        match = re.match(r"\s*(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if indent == base and match:
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current is not None:
            args[current] += " " + line.strip()
    return {name: ROLE.sub(lambda m: f"``{m.group(1).rsplit('.', 1)[-1]}``", text) for name, text in args.items()}


def _type_text(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = str(text).replace("typing.", "")
    return " or ".join(f"`{part.strip()}`" for part in text.split("|"))


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if hasattr(value, "value") and not isinstance(value, (str, int, float)):  # enums
        value = value.value
    if dataclasses.is_dataclass(value):  # nested settings: their own table has the defaults
        return f"`{type(value).__name__}()`"
    return f"`{value!r}`"


def _resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def config_markdown(path: str) -> str:
    """A table of the fields of the config dataclass at ``path`` (fields inherited from PEFT listed apart)."""
    cls = _resolve(path)
    described = docstring_args(cls)
    inherited: set[str] = set()
    try:
        from peft import PeftConfig

        if issubclass(cls, PeftConfig):
            inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    except ImportError:
        pass

    def rows(fields: list[dataclasses.Field]) -> list[str]:
        lines = ["| field | type | default | description |", "|---|---|---|---|"]
        for field in fields:
            text = described.get(field.name) or field.metadata.get("help", "")
            lines.append(f"| `{field.name}` | {_type_text(field.type)} | {_default_text(field)} | {_cell(text)} |")
        return lines

    fields = [f for f in dataclasses.fields(cls) if f.init]
    own = [f for f in fields if f.name not in inherited]
    out = rows(own)
    base = [f for f in fields if f.name in inherited]
    if base:
        out += [
            "",
            '??? note "Fields inherited from `peft.PeftConfig`"',
            "",
            "    PEFT sets these itself when a model is wrapped or loaded; they are listed for completeness.",
            "",
            *("    " + line for line in rows(base)),
        ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- parameter counts


@functools.cache
def _counts(variant: str, plain: bool, r: int | None = None) -> dict[str, Any]:
    from convlora.models import parameter_counts
    from convlora.tuner.config import ConvLoraConfig

    config = ConvLoraConfig() if r is None else ConvLoraConfig(r=r)
    return parameter_counts(variant, config, plain_lora=plain)


def parameter_counts_markdown() -> str:
    """LoRA and Conv-LoRA at the default settings on SAM ViT-B/L/H (as ``convlora params`` prints them)."""
    from convlora.tuner.config import ConvLoraConfig

    config = ConvLoraConfig()
    out = [
        "| SAM | base parameters | method | adapter | of which conv experts + gates | mask decoder (trained) "
        "| extra after merge |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for variant in ("vit-b", "vit-l", "vit-h"):
        lora = _counts(variant, True)
        conv = _counts(variant, False)
        for method, c in (("LoRA", lora), ("Conv-LoRA", conv)):
            out.append(
                f"| {variant} | {c['model']:,} | {method} | {c['adapter']:,} | {c['conv_experts']:,} | "
                f"{c['mask_decoder']:,} | {c['merged_extra']:,} |"
            )
    b_lora, b_conv = _counts("vit-b", True)["adapter"], _counts("vit-b", False)["adapter"]
    out += [
        "",
        f"Settings: `r={config.r}`, `lora_alpha={config.lora_alpha:g}`, {config.num_experts} experts with scales "
        f"{', '.join(f'{s:g}' for s in config.expert_scales)}, full 3x3 convolutions, the fused `qkv` of every "
        f"encoder layer. On ViT-B the conv experts and gates add {100 * (b_conv - b_lora) / b_lora:.1f}% to LoRA's "
        "adapter. The counts are exact and the same on any machine: this table is computed when the documentation "
        "is built, with `convlora.models.params.parameter_counts` on the meta device (no weights are downloaded); "
        '`convlora params` prints the same numbers. "Mask decoder" counts the whole decoder; the training engine '
        "then freezes its IoU head and the mask-token MLPs prompt-free segmentation does not use "
        "(`freeze_iou_head`).",
    ]
    return "\n".join(out)


RANKS = (1, 3, 4, 8, 16)


def rank_table_markdown() -> str:
    """Adapter parameters on SAM ViT-B against the rank, LoRA and Conv-LoRA (8 experts)."""
    out = [
        "| `r` | LoRA adapter | Conv-LoRA adapter | of which conv experts + gates | Conv-LoRA / LoRA |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in RANKS:
        lora, conv = _counts("vit-b", True, r), _counts("vit-b", False, r)
        out.append(
            f"| {r} | {lora['adapter']:,} | {conv['adapter']:,} | {conv['conv_experts']:,} | "
            f"{conv['adapter'] / lora['adapter']:.3f} |"
        )
    decoder = _counts("vit-b", False)["mask_decoder"]
    out += [
        "",
        "SAM ViT-B, `qkv` of all 12 layers, 8 full-convolution experts; computed at build time with "
        "`convlora.models.params.parameter_counts` (`convlora params --variants vit-b --r R` prints one row). The mask "
        f"decoder ({decoder:,} parameters, trained in full) is the same for every rank.",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ domains


def domains_markdown() -> str:
    """One row per domain recipe: what it stands for, its metric and loss, the paper settings, the script."""
    from convlora.recipes import RECIPES
    from convlora.synthetic import DOMAINS

    out = [
        "| domain | real dataset | task | main metric | loss | real-data lr, epochs | example |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, spec in RECIPES.items():
        domain = DOMAINS.get(name)
        task = f"{domain.mode}, {domain.num_classes} classes" if domain else ""
        script = f"`examples/{name}.py`" if (ROOT / "examples" / f"{name}.py").is_file() else ""
        out.append(
            f"| `{name}` | {_cell(spec.dataset)} | {task} | `{spec.metric}` | `{spec.loss}` | "
            f"{spec.real.get('lr', '')}, {spec.real.get('epochs', '')} | {script} |"
        )
    out += ["", "What each synthetic stand-in draws (from `convlora.synthetic.DOMAINS`):", ""]
    out += [f"- **{name}**: {spec.description}." for name, spec in DOMAINS.items()]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- embedded model


def embedded_model_markdown() -> str:
    """The pretraining record of ``convlora-tiny``, or a note that it is not in this checkout."""
    try:
        from convlora.models.embedded import embedded_info

        record = embedded_info("convlora-tiny")
    except (ImportError, ValueError, OSError, json.JSONDecodeError):
        return (
            '!!! note "Embedded model not built in this checkout"\n\n'
            "    `convlora-tiny` is produced by `python tools/pretrain_base.py` and ships inside the package "
            "(`convlora/assets/convlora-tiny/`). Its pretraining record (command, machine, held-out IoU) appears "
            "here once the weights are committed."
        )
    arch = record.get("architecture", {})
    machine = record.get("machine", {})
    held = {k: v for k, v in record.get("held_out", {}).items() if isinstance(v, float)}
    lines = [
        "| | |",
        "|---|---|",
        f"| parameters | {record.get('parameters', 0):,} |",
        f"| input size | {arch.get('image_size')} x {arch.get('image_size')} |",
        f"| encoder | {arch.get('num_hidden_layers')} layers, width {arch.get('hidden_size')}, patch "
        f"{arch.get('patch_size')}, window {arch.get('window_size')}, global attention in layers "
        f"{arch.get('global_attn_indexes')} |",
        f"| pretraining data | {_cell(str(record.get('corpus', '')))} |",
        f"| steps, images seen | {record.get('steps', 0):,}, {record.get('images_seen', 0):,} |",
        f"| wall time | {record.get('wall_time_s', 0) / 60:.0f} min |",
        f"| machine | {_cell(str(machine.get('cpu', '?')))}, {machine.get('torch_threads', '?')} torch threads, "
        f"torch {machine.get('torch', '?')} |",
        f"| command | `{_cell(str(record.get('command', '')))}` |",
    ]
    if held:
        images = record.get("held_out", {}).get("images")
        scores = ", ".join(f"{k} {v:.3f}" for k, v in held.items())
        lines.append(f"| held-out images ({images}) | {_cell(scores)} |")
    return "\n".join(lines) + "\n\nRead from `convlora/assets/convlora-tiny/pretraining.json` when the docs are built."


# --------------------------------------------------------------------------------------- benchmarks


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flat(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(_format(v) for v in value)
    return _cell(str(value))


def _table(records: list[dict[str, Any]]) -> list[str]:
    flat = [_flat(r) for r in records]
    columns: list[str] = []
    for record in flat:
        columns += [k for k in record if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(r.get(c)) for c in columns) + " |" for r in flat]
    return lines


def _machine_line(data: dict[str, Any]) -> str:
    env = data.get("environment") or {}
    machine = env.get("machine") or data.get("machine") or {}
    if not isinstance(machine, dict) or not machine:
        return "the machine is not recorded in this file"
    parts = [str(machine.get("cpu", "unknown CPU"))]
    if machine.get("usable_cores") or machine.get("cores"):
        parts.append(f"{machine.get('usable_cores') or machine.get('cores')} cores")
    if env.get("threads"):
        parts.append(f"{env['threads']} torch threads")
    gpu = machine.get("gpu")
    if isinstance(gpu, dict) and gpu.get("name"):
        parts.append(f"GPU {gpu['name']}")
    versions = env.get("versions") or {}
    if versions.get("torch"):
        parts.append(f"torch {versions['torch']}")
    commit = env.get("commit")
    if isinstance(commit, dict) and commit.get("sha"):
        parts.append(f"commit {str(commit['sha'])[:10]}")
    return ", ".join(parts)


PLOTS_DIR = "benchmark-plots"  # where the benchmark page's plots go in the site
IMAGE = re.compile(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)")


def _project_report() -> Any:
    """The benchmark's own report module (tables from its result schema), or None if this checkout lacks it."""
    try:
        report = importlib.import_module("convlora.bench.report")
    except ImportError:
        return None
    needed = ("load_results", "result_markdown")
    return report if all(hasattr(report, name) for name in needed) else None


def benchmark_plots(results_dir: Path = RESULTS_DIR) -> dict[str, bytes]:
    """PNG plots of every result, drawn from its JSON now by the benchmark's own plot functions."""
    import tempfile

    report = _project_report()
    if report is None or not Path(results_dir).is_dir():
        return {}
    plots: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for result in report.load_results(results_dir):
            name = result["name"]
            drawers = [(f"{name}.png", getattr(report, f"plot_{result['kind']}", None))]
            if result.get("sweeps"):
                drawers.append((f"{name}_scaling.png", getattr(report, "plot_scaling", None)))
            for filename, draw in drawers:
                if draw is None:
                    continue
                draw(result, Path(tmp) / filename)
                plots[filename] = (Path(tmp) / filename).read_bytes()
    return plots


def benchmarks_markdown(results_dir: Path = RESULTS_DIR, plots: set[str] | None = None) -> str:
    """Tables of every committed result file, or a note that none are committed yet.

    Result files in the benchmark's schema are rendered by its own report functions; any other JSON file
    in the folder by a generic table of its records. ``plots`` names the plot files available to the page
    (under ``PLOTS_DIR``); image links to other files are left out.
    """
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        return (
            '!!! note "No benchmark results are committed yet"\n\n'
            "    The benchmark writes one JSON file per experiment to `benchmarks/results/`. This page is built "
            "from those files, so the tables appear here as soon as results are committed; no number on this "
            "page is typed by hand."
        )
    plots = plots or set()
    out: list[str] = []
    rendered: set[str] = set()
    report = _project_report()
    if report is not None:
        for result in report.load_results(results_dir):  # quality, instances, cost; by name
            text = report.result_markdown(result)

            def image(match: re.Match[str]) -> str:
                name = match.group(2)
                return f"![{match.group(1)}]({PLOTS_DIR}/{name})" if name in plots else ""

            out += [IMAGE.sub(image, text), ""]
            rendered.add(str(result.get("name")))
    for path in files:
        if path.stem in rendered:
            continue
        out += _generic_result(path)
    return "\n".join(out)


def quality_table_markdown(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """The by-domain table of the committed quality result ``name`` (main metric per arm), as the README shows it."""
    report = _project_report()
    path = Path(results_dir) / f"{name}.json"
    if report is None or not path.is_file():
        return f"*(no committed result `benchmarks/results/{name}.json` yet)*"
    from convlora.bench.markdown import _by_domain_table

    result = json.loads(path.read_text())
    arms = [a["name"] for a in result["config"]["arms"]]
    return "\n".join(_by_domain_table(result["summary"], arms, result["summary"][0]["baseline"]))


def _generic_result(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"## `{path.name}`", "", f"Could not read this file: {_cell(str(error))}", ""]
    if not isinstance(data, dict):
        return []
    experiment = data.get("experiment") if isinstance(data.get("experiment"), dict) else {}
    out = [f"## {data.get('name') or experiment.get('name') or path.stem}", ""]
    description = data.get("description") or experiment.get("description")
    if description:
        out += [str(description), ""]
    out += [f"Measured on: {_machine_line(data)}. Source: `benchmarks/results/{path.name}`."]
    if data.get("command"):
        out += ["", f"Command: `{data['command']}`"]
    out.append("")
    for key, value in data.items():
        if key in ("experiment", "environment") or not isinstance(value, list) or not value:
            continue
        if all(isinstance(v, dict) for v in value):
            out += [f"**{key}**", "", *_table(value), ""]
    return out


# ------------------------------------------------------------------------------------------- hooks


GENERATORS = {
    "cli": lambda arg: cli_markdown(),
    "config": config_markdown,
    "parameter-counts": lambda arg: parameter_counts_markdown(),
    "rank-table": lambda arg: rank_table_markdown(),
    "domains": lambda arg: domains_markdown(),
    "embedded-model": lambda arg: embedded_model_markdown(),
    "benchmarks": lambda arg: benchmarks_markdown(RESULTS_DIR, _plots),
    "quality-table": lambda arg: quality_table_markdown(arg),
}


def render_markers(markdown: str, source: str = "page") -> str:
    """Replace every ``<!-- generated:NAME [ARG] -->`` line of a page by the generated Markdown."""

    def replace(match: re.Match[str]) -> str:
        name, arg = match.group(1), match.group(2)
        if name not in GENERATORS:
            raise ValueError(f"{source}: unknown marker 'generated:{name}'; known: {sorted(GENERATORS)}")
        return GENERATORS[name](arg)

    return MARKER.sub(replace, markdown)


_plots: set[str] = set()


def on_files(files: Any, config: Any) -> Any:
    """Add the benchmark plots, and a placeholder robustness page while the real one has not landed."""
    from mkdocs.structure.files import File

    if files.get_file_from_path("robustness.md") is None:
        files.append(File.generated(config, "robustness.md", content=ROBUSTNESS_PLACEHOLDER))
    _plots.clear()
    for name, content in benchmark_plots().items():
        files.append(File.generated(config, f"{PLOTS_DIR}/{name}", content=content))
        _plots.add(name)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill in the generated parts of a page."""
    return render_markers(markdown, page.file.src_uri)
