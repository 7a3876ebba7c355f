"""Stage names: one parser, one order, the LLM layer of a stage, defaults spread over depth."""

from __future__ import annotations

import pytest

from seglens import stages


def test_parse_round_trips_every_contract_name_and_refuses_others():
    names = ["vision.1", "vision.24", "encoder", "adapter", "llm.1", "llm.32", "llm.final_norm"]
    for name in names:
        assert stages.parse(name).name == name
    assert stages.parse("llm.7") == stages.Stage("llm", 7)
    for bad in ("llm.0", "llm.-1", "llm.07", "llm", "vision.x", "Adapter", "llm.1.2", ""):
        with pytest.raises(ValueError, match="is not a stage name"):
            stages.parse(bad)
        assert not stages.is_stage(bad)


def test_order_follows_the_forward_pass():
    shuffled = ["llm.10", "adapter", "llm.2", "vision.1", "encoder", "llm.final_norm", "llm.1"]
    assert stages.order([*shuffled, "llm.2"]) == [
        "vision.1",
        "encoder",
        "adapter",
        "llm.1",
        "llm.2",
        "llm.10",
        "llm.final_norm",
    ]
    assert stages.by_depth(shuffled) == ["llm.1", "llm.2", "llm.10"]
    assert [stages.llm_layer(s) for s in ("llm.12", "llm.final_norm", "adapter")] == [
        12,
        None,
        None,
    ]


def test_defaults_spread_over_depth_equal_a_naive_loop():
    for L in range(1, 41):
        for count in (1, 3, 4):
            naive = []
            for k in range(1, count + 1):
                layer = max(1, round(L * k / count))
                if layer not in naive:
                    naive.append(layer)
            assert stages.spread(L, count) == naive
            assert stages.spread(L, count)[-1] == L
        assert stages.middle_layer(L) == -(-L // 2)
        assert stages.default_stages(L) == ["encoder", "adapter"] + [
            f"llm.{i}" for i in range(1, L + 1)
        ]
    assert stages.summarise(["vision.1", "vision.2", "encoder", "adapter", "llm.1", "llm.2"]) == (
        "vision.1..vision.2, encoder, adapter, llm.1..llm.2"
    )
