"""The order and heads analyses end to end on a tiny probing run: sections, arrays, report."""

from __future__ import annotations

import numpy as np

from seglens.analyses.heads.measure import run_heads
from seglens.analyses.order.measure import follows_sequence, order_differences, order_tables
from seglens.cli import main
from seglens.commands import draw
from seglens.rundir import RunDir
from seglens.rundir.schema import load_results


def test_order_and_heads_run_and_are_drawn(make_probe_run, tiny_models, capsys):
    vlm = tiny_models("clip")
    run = make_probe_run("order_heads")
    argv = ["order", "--run", str(run), "--orders", "reversed", "--position-ids", "token"]
    assert main(argv) == 0
    assert "reversed/token - raster on the first image rows" in capsys.readouterr().out
    order = load_results(run / "results.json")["order"]
    assert order["conditions"] == ["raster", "reversed/token"]
    arrays = np.load(run / order["arrays_file"])
    correct, valid = arrays["raster.correct"], arrays["raster.valid"]
    assert correct.shape == (8, vlm.num_image_tokens) and not (correct & ~valid).any()
    assert (arrays["reversed.token.perm"][:, 0] == vlm.num_image_tokens - 1).all()
    # raster: the sequence and the rows are the same reading
    assert order["bands"]["raster"]["by_row"] == order["bands"]["raster"]["by_sequence"]
    diff = order["differences"]["reversed/token"]["by_row.first"]
    assert diff["n_images"] == 8 and diff["estimate"] is not None
    assert order["follows_sequence"] == {"reversed/token": None}  # bootstrap 0: no verdict
    # The random-weight model, with intervals from its saved arrays: the verdict must not hold.
    tables = {
        name: order_tables(
            *(arrays[f"{name.replace('/', '.')}.{k}"] for k in ("correct", "valid", "perm")),
            tuple(order["grid"]),
            order["band_rows"],
        )
        for name in order["conditions"]
    }
    _, differences = order_differences(tables, n_resamples=300, seed=0)
    assert follows_sequence(differences, "reversed/token") is False
    one_pair = {"knockout.top_k": 1, "knockout.max_images": 4, "knockout.min_support": 1}
    rundir = RunDir.open(run, **one_pair)
    heads = run_heads(
        rundir, vlm=vlm, progress=False, top_k=(2,), random_draws=1, rank_split="eval"
    )
    L, H = heads["num_layers"], heads["num_heads"]
    assert len(heads["ranking"]) == L * H and np.asarray(heads["share"]).shape == (L, H)
    assert heads["conditions"] == ["none", "all", "top2", "random2"]
    assert heads["pairs"], "the tiny run should give at least one pair"
    draw(run)
    results = load_results(run / "results.json")
    assert results["order"]["layer"] == order["layer"] and results["heads"]["top_k"] == [2]
    page = (run / "report.html").read_text()
    assert '<section id="order">' in page and 'id="fig-order_positions"' in page
    assert "reversed/token" in page and "first rows" in page
    assert '<section id="heads">' in page and 'id="fig-heads_share"' in page
    assert 'id="fig-heads_knockout"' in page and "layer / head" in page
