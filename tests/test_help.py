"""The ``--model`` and ``--dataset`` help texts list what the registries hold, so they cannot go
stale, and are built only when the help is printed (the registries import torch)."""

from __future__ import annotations

import argparse
import re

import pytest

from seglens import cli
from seglens.cli import add_run_options, main
from seglens.config import config_help
from seglens.data.datasets import DATASETS
from seglens.models.loading import NAMED_MODELS, TINY_MODELS


def _help_line(text: str, option: str) -> str:
    """The help of ``option`` in ``--help`` output: its line and the indented lines after it."""
    lines = text.splitlines()
    start = [i for i, line in enumerate(lines) if line.lstrip().startswith(f"{option} ")]
    assert len(start) == 1, text
    block = [lines[start[0]]]
    for line in lines[start[0] + 1 :]:
        if not line.startswith(" " * 6) or line.lstrip().startswith("-"):
            break
        block.append(line)
    return " ".join(block)


def _names_in(line: str) -> set[str]:
    return set(re.findall(r"[\w.-]+", line))


@pytest.mark.parametrize("command", ["run", "probe"])
def test_model_and_dataset_help_list_every_registry_name(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: argparse would break names at hyphens
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    models = [*NAMED_MODELS, *TINY_MODELS]
    assert len(TINY_MODELS) >= 16 and "organism" in models
    missing = [name for name in models if name not in _names_in(_help_line(text, "--model"))]
    assert not missing, f"--model help lacks {missing}"
    dataset_help = _names_in(_help_line(text, "--dataset"))
    assert not [name for name in DATASETS if name not in dataset_help]


def test_help_is_built_only_when_printed(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_model_help", lambda: calls.append("model") or "MODELS %(dest)s")
    monkeypatch.setattr(cli, "_dataset_help", lambda: calls.append("dataset") or "DATASETS")
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    assert calls == []
    text = parser.format_help()
    assert sorted(calls) == ["dataset", "model"]
    assert "MODELS model.name" in text  # argparse's %-expansion still applies
    assert "DATASETS" in text
    defaults = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_options(defaults)
    assert "DATASETS (default: None)" in defaults.format_help()
    assert sorted(calls) == ["dataset", "dataset", "model", "model"]  # once per parser


def test_config_help_of_the_dataset_names_every_registered_dataset():
    help_text = next(text for key, text, _ in config_help() if key == "data.dataset")
    assert not [name for name in DATASETS if name not in _names_in(help_text)]


def test_building_the_parser_imports_no_torch():
    """``seglens --help`` stays fast: no subcommand's options import torch until printed."""
    import subprocess
    import sys

    code = "import sys; from seglens.cli import build_parser; build_parser(); "
    code += "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_organism_help_shows_the_recipe_defaults(capsys, monkeypatch):
    from seglens.organism import Recipe

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["organism", "--help"])
    text = capsys.readouterr().out
    for name in ("scenes", "tower_steps", "text_steps", "steps", "batch_size"):
        assert f"recipe: {name} (default {getattr(Recipe(), name)})" in text
    args = cli.build_parser().parse_args(["organism", "train", "--out", "o", "--steps", "3"])
    assert (args.steps, args.scenes) == (3, None)  # None: the recipe's default applies
