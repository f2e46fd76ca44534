"""Every default the README and the docs quote is the default the code has.

The prose says things like "``refine_steps=30`` by default" or "By default (``skip_fooled=False``)". This
test finds such quotes and checks each against ``inspect.signature`` of the public callables (and the
command line's own defaults for ``--flag`` quotes), so a changed default cannot leave the docs behind.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst")), *sorted((ROOT / "docs").glob("*.md"))]

#: The public callables whose keyword defaults the prose may quote.
CALLABLES = (
    "krtfuap.attack:UAPAttack",
    "krtfuap.attack:UAPAttack.paper",
    "krtfuap.baselines:RandomNoiseUAP",
    "krtfuap.baselines:SGDUAP",
    "krtfuap.baselines:FGUAP",
    "krtfuap.baselines:FrequencyUAP",
    "krtfuap.baselines:DeepFoolUAP",
    "krtfuap.masks:KeyRegionMasker",
    "krtfuap.perturbation:MaskedPerturbation",
    "krtfuap.flow:FlowWarp",
    "krtfuap.key_regions:KeyRegions",
    "krtfuap.refine:refine_on_photo",
    "krtfuap.paste:paste_perturbation",
    "krtfuap.apps.cloak:PhotoCloak",
    "krtfuap.apps.cloak:PhotoCloak.cloak_files",
    "krtfuap.datasets:FaceFolder",
    "krtfuap.datasets:PairDataset",
)

_QUOTE = r"`{1,2}([a-z_]+)\s*=\s*([^`]+?)`{1,2}"
#: "``name=value`` by default", "``name=value`` (the default", "``name=value``, now the default"
_QUOTE_THEN_DEFAULT = re.compile(_QUOTE + r"\s*(?:by\s+default|\(the\s+default|,?\s+(?:now\s+)?the\s+default)")
#: "By default (``a=1``, ``b=2``" and "**Global by default** (``a=1``": every quote inside the parenthesis
_DEFAULT_THEN_PARENTHESIS = re.compile(r"[Dd]efault\**\s*\(([^)]*)")
#: "The default, ``name=value``, is" / "The default is ``name=value``"
_THE_DEFAULT_IS = re.compile(r"The\s+default(?:,|\s+is)\s*" + _QUOTE)
#: "``--flag``, 95 by default" and "``--flag N`` ... (default N)"
_FLAG_THEN_DEFAULT = re.compile(r"`{1,2}--([a-z-]+)`{1,2},?\s+([\w.\"'-]+)\s+by\s+default")


def _resolve(path: str):
    module, _, qualname = path.partition(":")
    try:
        target = importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def _documented_defaults() -> dict[str, list[object]]:
    """Parameter name -> the defaults it has among :data:`CALLABLES` (a name may belong to several)."""
    defaults: dict[str, list[object]] = {}
    for path in CALLABLES:
        target = _resolve(path)
        if target is None:
            continue
        for name, parameter in inspect.signature(target).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults.setdefault(name, []).append(parameter.default)
    return defaults


def _cli_defaults() -> dict[str, list[object]]:
    """``--flag`` (without dashes) -> its defaults over every ``krtfuap`` subcommand."""
    from krtfuap.apps.cli import build_parser

    found: dict[str, list[object]] = {}
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:  # argparse has no public walk over its actions
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            for option in action.option_strings:
                if option.startswith("--"):
                    found.setdefault(option[2:], []).append(action.default)
    return found


def _value(text: str) -> object:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip().strip("'\"")


def _matches(pattern: re.Pattern) -> list[tuple[str, int, re.Match]]:
    """``(file, line, match)`` of ``pattern`` over every document, line breaks read as spaces."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in pattern.finditer(text.replace("\n", " ")):  # same offsets, so lines can be counted
            found.append((document.name, text.count("\n", 0, match.start()) + 1, match))
    return found


def _quotes() -> list[tuple[str, int, str, str]]:
    """``(file, line, name, value)`` of every quoted default of a keyword."""
    found = [(where, line, m.group(1), m.group(2)) for pattern in (_QUOTE_THEN_DEFAULT, _THE_DEFAULT_IS)
             for where, line, m in _matches(pattern)]
    for where, line, match in _matches(_DEFAULT_THEN_PARENTHESIS):
        found += [(where, line, quote.group(1), quote.group(2)) for quote in re.finditer(_QUOTE, match.group(1))]
    return found


def _flag_quotes() -> list[tuple[str, int, str, str]]:
    """``(file, line, flag, value)`` of every quoted default of a command-line flag."""
    return [(where, line, m.group(1), m.group(2)) for where, line, m in _matches(_FLAG_THEN_DEFAULT)]


def test_the_docs_quote_defaults_at_all():
    """The patterns still find the quotes (a rewrite of the prose must not silently empty this check)."""
    assert len(_quotes()) >= 5
    assert _flag_quotes()


def _check_quote(where: str, line: int, shown: str, value: str, defaults: list[object] | None, owner: str) -> None:
    """A quoted default ``shown = value`` must belong to some ``owner`` and equal one of its ``defaults``."""
    assert defaults is not None, f"{where}:{line} quotes a default for {shown}, which no {owner} takes"
    assert _value(value) in defaults, f"{where}:{line} says {shown} is {value} by default; the code's: {defaults}"


@pytest.mark.parametrize("where, line, name, value", _quotes(), ids=lambda item: str(item))
def test_quoted_keyword_default_is_the_code_default(where, line, name, value):
    _check_quote(where, line, repr(name), value, _documented_defaults().get(name), "public callable")


@pytest.mark.parametrize("where, line, flag, value", _flag_quotes(), ids=lambda item: str(item))
def test_quoted_flag_default_is_the_command_line_default(where, line, flag, value):
    _check_quote(where, line, f"--{flag}", value, _cli_defaults().get(flag), "krtfuap subcommand")
