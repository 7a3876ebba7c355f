"""The CLI shells: info, capture, and one-line errors instead of tracebacks."""

from __future__ import annotations

import json

import pytest

from seglens.cli import main


def test_info_lists_stages(capsys):
    assert main(["info", "--model", "tiny-siglip", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["geometry"] == "resize"
    assert info["grid"] == [16, 16]
    assert list(info["stages"])[:2] == ["vision.1", "vision.2"]
    assert info["stages"]["adapter"] == info["stages"]["llm.1"]
    assert "llm.final_norm" in info["stages"]


def test_capture_writes_stage_statistics(tmp_path, capsys):
    out = tmp_path / "cap"
    argv = [
        "capture",
        "--model",
        "tiny-clip",
        "--dataset",
        "synthetic",
        "--limit",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--stages",
        "encoder",
        "llm.4",
    ]
    assert main(argv) == 0
    stats = json.loads((out / "stage_stats.json").read_text())
    assert list(stats["stages"]) == ["encoder", "llm.4"]
    assert stats["stages"]["encoder"]["shape"] == [3, 256, 48]
    assert stats["stages"]["llm.4"]["tokens"] == 3 * 256
    assert stats["seed"] == 0
    assert "stage" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "--model", "tiny-clp"], "did you mean 'tiny-clip'"),
        (
            ["capture", "--model", "tiny-clip", "--dataset", "ade2k", "--data-root", "x"],
            "did you mean 'ade20k'",
        ),
        (
            ["capture", "--model", "tiny-clip", "--dataset", "ade20k", "--data-root", "/nowhere"],
            "/nowhere does not exist",
        ),
        (
            [
                "capture",
                "--model",
                "tiny-clip",
                "--dataset",
                "synthetic",
                "--limit",
                "1",
                "--stages",
                "llm.7",
            ],
            "unknown stage 'llm.7'",
        ),
    ],
)
def test_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "capture" else argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.startswith(f"seglens {argv[0]}: error:")
