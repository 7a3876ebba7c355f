"""The README documents every config option and both set-up commands."""

from __future__ import annotations

from pathlib import Path

from seglens.config import config_help

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_option_is_documented():
    text = README.read_text()
    missing = [key for key, _help, _default in config_help() if f"`{key}`" not in text]
    assert not missing, f"README lacks options: {missing}"


def test_every_option_has_help():
    assert all(help_text for _key, help_text, _default in config_help())


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text
    assert "make test" in text
