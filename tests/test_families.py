"""The shared invariants, on the registered tiny models of every family (derived from the registry).

Per family: captured stages equal independent HF paths exactly (``REFERENCES`` of the family's
``test_families_<family>.py``); the token -> grid map is right (a signal planted at one
patch-grid cell, located independently by the family's ``PLANTS``, lands on that cell's image slot
at every early stage and in the LLM input embeddings); the intervention invariants hold (an empty
spec and the native spec change nothing bit for bit; perturbing image slot j moves earlier slots
only when the image block is natively bidirectional, never under ``CausalImage``, always under
``BidirectionalImage``); a padded batch equals each row alone; inputs equal the HF processor's;
``load_model`` and ``save_pretrained`` round-trip. A family missing from the helper tables fails.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import cached_model, earlier_slots_move, record_llm_input
from seglens.interventions import (
    BidirectionalImage,
    BidirectionalPrefix,
    CausalImage,
    Knockout,
    TokenSet,
    intervene,
)
from seglens.models import registry


def shared_check_models() -> list[str]:
    """Every registered tiny model without family options (options such as LLaVA-NeXT's tile grid
    change the layout the family references assume; they have their own test modules)."""
    return [name for name, spec in registry().tiny.items() if not spec.family_options]


TINY = shared_check_models()


def helper_tables() -> tuple[dict, dict]:
    """``REFERENCES`` and ``PLANTS`` of every ``test_families_*.py`` module, merged."""
    references, plants = {}, {}
    for path in sorted(Path(__file__).parent.glob("test_families_*.py")):
        module = importlib.import_module(path.stem)
        references.update(getattr(module, "REFERENCES", {}))
        plants.update(getattr(module, "PLANTS", {}))
    return references, plants


REFERENCES, PLANTS = helper_tables()
NATIVE_SPECS = {
    "causal": [],
    "bidirectional": [BidirectionalImage()],
    "prefix": [BidirectionalPrefix()],
}


@pytest.fixture(params=TINY)
def vlm(request):
    return cached_model(request.param)


@pytest.fixture
def batch(vlm, random_images):
    """Two images, two prompt lengths: the shorter row is right-padded."""
    out = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert not out.attention_mask.all()
    return out


def test_every_family_has_a_tiny_model_and_its_checks():
    families = set(registry().families)
    assert {registry().tiny[name].family.name for name in TINY} == families
    assert set(REFERENCES) == families, "add REFERENCES to the family's test_families_<f>.py"
    assert set(PLANTS) == families, "add PLANTS to the family's test_families_<f>.py"
    for cls in registry().families.values():
        for model_type in vars(cls)["model_types"]:
            assert registry().model_types[model_type] is cls


def test_stages_equal_independent_paths(vlm, batch):
    got = vlm.capture(batch, vlm.stages)
    ref = REFERENCES[vlm.family.name](vlm, batch)
    n = vlm.num_image_tokens
    assert torch.equal(got["adapter"], ref["llm.0"])  # projector output = LLM input at images
    for stage, tensor in got.items():
        assert tensor.shape[:2] == (2, n), stage
        assert tensor.shape[2] == vlm.family.stage_widths()[stage], stage
        assert torch.equal(tensor, ref[stage]), stage
    L = vlm.num_llm_layers
    assert not torch.allclose(got[f"llm.{L}"], got["llm.final_norm"])


def test_token_to_grid_map(vlm, random_images):
    """A signal added to every vision patch of grid cell (r, c) lands on image slot r * g + c."""
    batch = vlm.prepare(random_images(1))
    g_rows, g_cols = vlm.grid
    stages = ["encoder", "adapter", "llm.1"]
    clean = vlm.capture(batch, stages)
    for r, c in [(0, 0), (1, g_cols - 2), (g_rows - 1, 2)]:
        embeds = {}
        handles = [
            PLANTS[vlm.family.name](vlm, r, c, len(batch)),
            record_llm_input(vlm, batch, embeds),
        ]
        try:
            planted = vlm.capture(batch, stages)
        finally:
            for h in handles:
                h.remove()
        k = r * g_cols + c
        for stage in ("encoder", "adapter"):
            changed = (planted[stage] - clean[stage]).abs().amax(-1)[0] > 1e-4
            assert changed.nonzero().flatten().tolist() == [k], (stage, r, c)
        assert torch.equal(planted["adapter"], embeds["x"])


def test_perturbation_respects_image_attention(vlm, batch):
    """Natively bidirectional: earlier slots move, and stop moving under CausalImage."""
    native = vlm.family.native_image_attention
    assert native in NATIVE_SPECS
    assert earlier_slots_move(vlm, batch) == (native != "causal")
    assert not earlier_slots_move(vlm, batch, [CausalImage()])
    assert earlier_slots_move(vlm, batch, [BidirectionalImage()])


def test_empty_spec_changes_nothing(vlm, batch):
    """intervene() starts from the family's own image block: [] and the native spec are no-ops."""
    ref = vlm.capture(batch)
    for specs in ([], NATIVE_SPECS[vlm.family.native_image_attention]):
        with intervene(vlm, specs):
            got = vlm.capture(batch)
        for stage in ref:
            assert torch.equal(got[stage], ref[stage]), (specs, stage)


def test_a_shared_prefix_is_exact(vlm, batch):
    """Inside ``SharedPrefix`` the image features run once and a layer window resumes from the
    clean pass's decoder outputs: every LLM stage equals the unshared forward bit for bit."""
    from seglens.prefix import SharedPrefix

    layers = vlm.num_llm_layers
    llm = [f"llm.{i}" for i in range(1, layers + 1)]
    start = layers  # the window is the last layer: every layer before it is resumed
    spec = Knockout(keys=TokenSet.from_slots(range(vlm.num_image_tokens // 2)), layers=(start,))
    with intervene(vlm, []):
        clean = vlm.capture(batch, ["adapter", *llm])
    with intervene(vlm, [spec]):
        knocked = vlm.capture(batch, llm)
    prefix = SharedPrefix(vlm, layers=start - 1)
    try:
        with intervene(vlm, []):
            shared_clean = vlm.capture(batch, ["adapter", *llm])
        with prefix.resume(start), intervene(vlm, [spec]):
            shared = vlm.capture(batch, llm)
        with intervene(vlm, []), pytest.raises(RuntimeError, match="adapter were not computed"):
            vlm.capture(batch, ["adapter"])
    finally:
        prefix.close()
    assert (prefix.image_calls, prefix.image_reused) == (1, 2)
    assert prefix.layers_skipped == start - 1
    for stage in clean:
        assert torch.equal(shared_clean[stage], clean[stage]), stage
    for stage in llm:
        assert torch.equal(shared[stage], knocked[stage]), stage
    assert not torch.equal(knocked[llm[-1]], clean[llm[-1]])  # the window did act
    # closed: the model runs in full again (the adapter stage is computed)
    assert torch.equal(vlm.capture(batch, ["adapter"])["adapter"], clean["adapter"])


def test_knockout_keeps_the_native_image_block(vlm, batch):
    """A knockout of the last image slot leaves a bidirectional family bidirectional."""
    if vlm.family.native_image_attention == "causal":
        pytest.skip("only natively bidirectional families")
    keys = TokenSet.from_slots([vlm.num_image_tokens - 1])
    assert earlier_slots_move(vlm, batch, [Knockout(keys=keys)])


def test_padded_rows_equal_single_images(vlm, random_images):
    images = random_images(2)
    both = vlm.capture(vlm.prepare(images, prompts=TWO_PROMPTS))
    for b in range(2):
        one = vlm.capture(vlm.prepare(images[b : b + 1], prompts=TWO_PROMPTS[b : b + 1]))
        for stage in one:
            torch.testing.assert_close(both[stage][b : b + 1], one[stage], rtol=1e-4, atol=1e-5)


def test_inputs_match_the_hf_processor(vlm, random_images):
    """Token ids equal the HF processor's, and so do the pixels it feeds the model.

    On an S x S image (S = the geometry's side) every processor resize is the identity, so the
    pixels compare exactly; families that reshape pixels (tiles) compare ``pixel_inputs``.
    """
    if not vlm.family.hf_processor:
        pytest.skip("no HF processor without torchvision; see the family's own input test")
    from PIL import Image

    S = vlm.geometry.size
    image = random_images(1, S, S)[0]
    batch = vlm.prepare([image])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.prompt}]}
    ]
    if vlm.family.prompt_ids(vlm.prompt, vlm.processor) is not None:
        pytest.skip("no chat template (PaliGemma): see its own input test")
    text = vlm.processor.apply_chat_template(conversation, add_generation_prompt=True)
    ref = vlm.processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == batch.input_ids[0].tolist()
    got = vlm.family.pixel_inputs(batch.pixel_values)
    for key, value in got.items():
        torch.testing.assert_close(value, ref[key].to(value.dtype), rtol=0, atol=1e-5, msg=key)


def test_save_pretrained_roundtrip(vlm, random_images, tmp_path):
    from seglens.models import load_model

    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.family.name == vlm.family.name
    assert loaded.geometry == vlm.geometry and loaded.grid == vlm.grid
    images = random_images(2)
    a = vlm.prepare(images, prompts=TWO_PROMPTS)
    b = loaded.prepare(images, prompts=TWO_PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)
    ref, got = vlm.capture(a), loaded.capture(b)
    for stage in ref:
        assert torch.equal(ref[stage], got[stage]), stage


def test_info_reports_the_family(vlm):
    info = vlm.info()
    assert info["family"] == vlm.family.name
    assert info["num_image_tokens"] == vlm.grid[0] * vlm.grid[1]
    assert set(vlm.default_stages) <= set(info["stages"])


def test_readme_lists_every_tiny_model():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Supported model families") :]
    missing = [name for name in registry().tiny if f"`{name}`" not in table]
    assert not missing, f"README's family table lacks {missing}"
