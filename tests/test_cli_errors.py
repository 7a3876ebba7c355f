"""Errors at the CLI boundary (issue 19, item 7): each failure a user can cause ends in one line
that names the file or value, the cause and the fix, with exit status 2; ``-v`` shows the
traceback; Ctrl-C says how to resume and exits 130."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglens.analyses.probing import measure as probing
from seglens.cli import main
from seglens.probes.bank import ProbeBank, load_probe
from seglens.rundir import put_section
from seglens.rundir.files import load_arrays, save_arrays

PROBE = ["probe", "--model", "tiny-clip", "--limit", "4", "--bootstrap", "0"]


def one_line(capsys) -> str:
    """The error line of a command's stderr (progress bars aside): one line, no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("seglens ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def probes(make_probe_run, tmp_path_factory) -> Path:
    """A copy of a finished run's probes (the tests damage them)."""
    run = make_probe_run("errors")
    copy = tmp_path_factory.mktemp("probes") / "causal"
    shutil.copytree(run / "probes" / "causal", copy)
    return copy


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("adapter.safetensors", "empty", r"adapter\.safetensors cannot be read \(0 bytes"),
        ("adapter.safetensors", "half", r"adapter\.safetensors cannot be read \(\d+ bytes"),
        ("adapter.json", "half", r"adapter\.json is not valid JSON \(.*\): truncated or damaged"),
        ("adapter.safetensors", "missing", r"adapter\.safetensors does not exist"),
    ],
)
def test_a_damaged_probe_is_named_with_the_fix(probes, tmp_path, name, damage, expected):
    folder = tmp_path / "causal"
    shutil.copytree(probes, folder)
    path = folder / name
    if damage == "missing":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(error, match=expected) as info:
        load_probe(folder / "adapter")
    assert str(folder) in str(info.value) and "seglens probe --overwrite" in str(info.value)
    load_probe(probes / "adapter")  # the intact copy still loads


def test_a_damaged_bank_json_is_named_with_the_fix(probes, tmp_path):
    folder = tmp_path / "causal"
    shutil.copytree(probes, folder)
    (folder / "bank.json").write_text('{"format": ')
    with pytest.raises(
        ValueError, match=r"bank\.json is not valid JSON \(.*\): truncated or damaged"
    ):
        ProbeBank.load(folder)
    ProbeBank.load(probes)  # the intact copy still loads


def test_a_damaged_probe_stops_knockout_with_one_line(make_probe_run, capsys):
    run = make_probe_run("knockout-damaged")
    stem = run / "probes" / "causal" / "adapter.safetensors"
    stem.write_bytes(stem.read_bytes()[:100])
    assert main(["knockout", "--run", str(run)]) == 2
    err = one_line(capsys)
    assert f"seglens knockout: error: {stem} cannot be read (100 bytes" in err


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_a_truncated_npz_is_named(tmp_path, cut):
    path = tmp_path / "arrays" / "probing_causal.npz"
    save_arrays(path, confusion=np.arange(400).reshape(20, 20))
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match=rf"{path} cannot be read .*truncated or damaged; rerun"):
        load_arrays(path)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/scratch/run/results.json"),
            "error: no space left on the device writing /scratch/run/results.json: free space "
            "or choose another --out. Every file is replaced whole or not at all, so nothing "
            "written is corrupt; run the same command with --resume",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/readonly/run"),
            "error: cannot write /data/readonly/run: Permission denied; choose an --out you can "
            "write to",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run/config.yaml"),
            "error: cannot write /mnt/ro/run/config.yaml: Read-only file system; choose an --out",
        ),
    ],
    ids=["full-disk", "permission", "read-only"],
)
def test_file_system_errors_are_one_line(monkeypatch, capsys, tmp_path, error, expected):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(probing, "run_probing", fail)
    assert main([*PROBE, "--out", str(tmp_path / "run")]) == 2
    assert one_line(capsys).startswith(f"seglens probe: {expected}")
    with pytest.raises(type(error)):  # -v: the traceback
        main(["-v", *PROBE, "--out", str(tmp_path / "run")])


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probing, "run_probing", interrupted)
    assert main([*PROBE, "--out", str(tmp_path / "run")]) == 130
    err = one_line(capsys)
    assert err.startswith("seglens probe: interrupted;")
    assert "Run the same command again with --resume to continue" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_device_cuda_without_cuda_is_one_line(capsys, tmp_path):
    assert main([*PROBE, "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    err = one_line(capsys)
    assert f"error: --device cuda: this torch {torch.__version__} is" in err
    assert "pass --device cpu, or install a CUDA build of torch" in err


def _unlabelled_folder(root: Path) -> Path:
    """A folder dataset whose masks are all ignore (255)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"im{i}.png")
            Image.fromarray(np.full((32, 32), 255, np.uint8)).save(
                root / split / "masks" / f"im{i}.png"
            )
    (root / "classes.txt").write_text("a\nb\n")
    return root


def test_no_labelled_token_says_why_and_does_not_block_a_plain_rerun(tmp_path, capsys):
    root = _unlabelled_folder(tmp_path / "data")
    argv = [*PROBE, "--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "r")]
    argv += ["--checkpoint-every", "1"]
    for _ in range(2):  # the second run meets the same data, not "already holds a run"
        assert main(argv) == 2
        err = one_line(capsys)
        assert "no labelled training token reached the probes" in err
        assert "every pixel is ignore (255)" in err and "lower data.min_valid" in err


def test_a_damaged_results_json_is_rebuilt_from_the_section_records(make_probe_run, capsys):
    run = make_probe_run("results-damaged")
    results = run / "results.json"
    # a later analysis adds its section, as knockout or findings do, and is recorded too
    put_section(run, "findings", {"drop": {"holds": None, "text": "planted"}})
    assert main(["report", "--run", str(run)]) == 0  # the report records its figures
    intact = results.read_bytes()
    results.write_text(results.read_text()[:200])
    assert main(["report", "--run", str(run)]) == 2
    err = one_line(capsys)
    assert f"error: {results} is not valid JSON (" in err
    assert f"`seglens report --run {run} --rebuild`" in err
    assert main(["report", "--run", str(run), "--rebuild"]) == 0
    assert results.read_bytes() == intact  # every section, in the order written, byte for byte
    assert (run / "report.html").is_file()


def test_a_damaged_results_json_without_records_says_what_cannot_be_rebuilt(make_probe_run, capsys):
    run = make_probe_run("results-damaged-old")
    shutil.rmtree(run / "sections")  # as a run of an older seglens
    results = run / "results.json"
    results.write_text(results.read_text()[:200])
    assert main(["report", "--run", str(run)]) == 2
    err = one_line(capsys)
    assert f"error: {results} is not valid JSON (" in err
    assert "it cannot be rebuilt: the run has no sections/ record" in err
    assert f"--config {run / 'config.yaml'} --overwrite" in err
    assert main(["report", "--run", str(run), "--rebuild"]) == 2
    assert "holds no record of the run's results" in one_line(capsys)
