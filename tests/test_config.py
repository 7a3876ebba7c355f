"""Config: precedence CLI > YAML > defaults, unknown keys and bad values are refused by name."""

from __future__ import annotations

import pytest
import yaml

from seglens.config import RunConfig, from_dict, load_config


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_precedence(tmp_path):
    path = write(tmp_path, {"probe": {"solver": "lda", "pixel_level": True}, "seed": 3})
    config = load_config(path, **{"probe.pixel_level": False, "seed": None})
    assert config.probe.solver == "lda"  # YAML beats the default
    assert config.probe.pixel_level is False  # an explicit False on the CLI beats the YAML
    assert config.seed == 3  # an option not given (None) overrides nothing
    assert load_config(path, **{"probe.solver": "sgd"}).probe.solver == "sgd"


def test_round_trip(tmp_path):
    config = load_config(**{"probe.lrs": (0.1, 0.2), "knockout.layers": (2, 3)})
    again = load_config(write(tmp_path, config.to_dict()))
    assert again == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"probe": {"solvr": "lda"}},
            r"unknown config key 'probe\.solvr' \(did you mean 'probe\.solver'",
        ),
        ({"probes": {}}, r"did you mean 'probe'"),
        ({"probe": {"epochs": "two"}}, r"'probe\.epochs' must be an integer, got 'two'"),
        ({"probe": {"solver": "svm"}}, r"probe\.solver='svm' is not one of \('sgd', 'lda'\)"),
        ({"data": {"batch_size": 0}}, r"data\.batch_size=0 must be >= 1"),
        ({"knockout": {"layers": [3, 1]}}, r"knockout\.layers=\(3, 1\) must be \[first, last\]"),
        ({"model": {"geometry": "squash"}}, r"model\.geometry='squash' is not one of"),
        ({"probe": {"pixel_level": "yes"}}, r"'probe\.pixel_level' must be true or false"),
        ({"umap": {"neighbors": 1}}, r"umap\.neighbors=1 must be >= 2"),
    ],
)
def test_bad_config(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("probe: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config(bad)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


def test_defaults_are_valid():
    assert from_dict(RunConfig, {}) == RunConfig()


def test_shipped_configs_load():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(folder.glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        config = load_config(path)
        assert config.out.startswith("runs/"), path
