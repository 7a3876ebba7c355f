"""More model families behind the same adapter interface: Gemma3 (natively bidirectional),
LLaVA-NeXT (anyres tiles and newline tokens after the probed base grid), Qwen2-VL and Qwen2.5-VL
(2x2-merged patches, M-RoPE, window attention).

Per family: captured stages equal independent HF paths exactly; the token -> grid map is right (a
signal planted at one patch-grid cell lands on that cell's image slot, at every stage and in the
LLM input embeddings); the intervention invariants hold (an empty spec changes nothing bit for bit,
perturbing image slot j moves earlier slots only when the image block is bidirectional); a padded
batch of two prompts works; ``load_model`` and ``save_pretrained`` round-trip.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import TWO_PROMPTS, hf_forward_last
from seglens.interventions import BidirectionalImage, CausalImage, Knockout, TokenSet, intervene

# Tiny registry names without the "tiny-" prefix.
FAMILIES = ["gemma3", "llava-next", "qwen2-vl", "qwen2.5-vl"]
QWEN = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module")
def family_models():
    """Cache of tiny models keyed by family name."""
    from seglens.models import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(f"tiny-{name}", dtype="float32")
        return cache[name]

    return get


@pytest.fixture(params=FAMILIES)
def vlm(request, family_models):
    return family_models(request.param)


@pytest.fixture
def batch(vlm, random_images):
    """Two images, two prompt lengths: the shorter row is right-padded."""
    out = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert not out.attention_mask.all()
    return out


def gather(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


# --- independent HF paths, per family -----------------------------------------------------------
def gemma3_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's own outputs: hidden_states, get_image_features, the tower's states."""
    model, inner = vlm.model, vlm.model.model
    token_type_ids = (batch.input_ids == model.config.image_token_id).long()  # as the processor
    out, last_block = hf_forward_last(
        model,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
        token_type_ids=token_type_ids,
    )
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
        adapter = inner.get_image_features(batch.pixel_values).pooler_output
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kernel = patches // vlm.grid[0]

    def pool(h):  # (B, P, D) -> (B, N, D): the projector's pooling, done independently
        B, _, D = h.shape
        grid = h.permute(0, 2, 1).reshape(B, D, patches, patches)
        return F.avg_pool2d(grid, kernel).reshape(B, D, -1).permute(0, 2, 1)

    pos = batch.image_positions
    L = vlm.num_llm_layers
    ref = {f"vision.{i}": pool(tower.hidden_states[i]) for i in range(1, len(tower.hidden_states))}
    ref["encoder"] = pool(tower.last_hidden_state)
    ref["adapter"] = adapter
    ref["llm.0"] = gather(out.hidden_states[0], pos)  # the LLM input embeddings
    ref.update({f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(1, L)})
    ref[f"llm.{L}"] = gather(last_block, pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    return ref


def qwen_hf_inputs(vlm, batch) -> dict[str, torch.Tensor]:
    """HF inputs built independently: HF's own patchify per image, grid, token types."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    vision = vlm.model.config.vision_config
    rows, grids = [], []
    for image in batch.pixel_values.numpy():
        flat, gh, gw = Qwen2VLImageProcessorPil().patchify(
            image, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )
        rows.append(torch.from_numpy(flat.copy()))
        grids.append([1, gh, gw])
    return {
        "pixel_values": torch.cat(rows),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": (batch.input_ids == vlm.model.config.image_token_id).int(),
    }


def qwen_raster_units(vlm, h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B * P, Dv) block outputs in the vision sequence order -> (B, N, 4 * Dv) raster order."""
    from transformers.vision_utils import get_vision_window_index

    vision = vlm.model.config.vision_config
    n = vlm.num_image_tokens
    units = h.reshape(batch_size, n, -1)
    if vlm.family.name == "qwen2_5_vl":  # blocks run in window order: undo it as HF does
        side = vlm.geometry.size // vision.patch_size
        window_index, _ = get_vision_window_index(
            torch.tensor([[1, side, side]]),
            vision.spatial_merge_size,
            vision.window_size,
            vision.patch_size,
        )
        units = units[:, torch.argsort(window_index)]
    return units


def qwen_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's own outputs: hidden_states, get_image_features, visual's states."""
    model, inner = vlm.model, vlm.model.model
    inputs = qwen_hf_inputs(vlm, batch)
    out, last_block = hf_forward_last(
        model,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        **inputs,
    )
    with torch.no_grad():
        tower = inner.visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True
        )
        adapter = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    B, pos, L = len(batch), batch.image_positions, vlm.num_llm_layers
    ref = {
        f"vision.{i}": qwen_raster_units(vlm, tower.hidden_states[i], B)
        for i in range(1, len(tower.hidden_states))
    }
    ref["encoder"] = qwen_raster_units(vlm, tower.last_hidden_state, B)
    ref["adapter"] = torch.stack(adapter.pooler_output)
    ref["llm.0"] = gather(out.hidden_states[0], pos)
    ref.update({f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(1, L)})
    ref[f"llm.{L}"] = gather(last_block, pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    return ref


def llava_next_pixels(vlm, batch) -> torch.Tensor:
    """HF's (B, 1 + T, 3, S, S) for the default tiny (pinpoints (S, S)): base image + one tile."""
    S = vlm.geometry.size
    assert vlm.model.config.image_grid_pinpoints == [[S, S]]
    return torch.stack([batch.pixel_values, batch.pixel_values], dim=1)


def llava_next_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's outputs; the base image is crop 0 and the first N placeholders."""
    model, inner = vlm.model, vlm.model.model
    pixels = llava_next_pixels(vlm, batch)
    S, B, n = vlm.geometry.size, len(batch), vlm.num_image_tokens
    sizes = torch.tensor([[S, S]] * B)
    out, last_block = hf_forward_last(
        model,
        input_ids=batch.input_ids,
        pixel_values=pixels,
        image_sizes=sizes,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
        adapter = inner.get_image_features(pixels, sizes).pooler_output
    crops = pixels.shape[1]

    def base(h):  # (B * crops, 1 + N, D) -> (B, N, D): crop 0, CLS dropped
        return h[::crops, 1:]

    pos, L = batch.image_positions, vlm.num_llm_layers
    hidden = tower.hidden_states
    ref = {f"vision.{i}": base(hidden[i]) for i in range(1, len(hidden))}
    ref["encoder"] = base(hidden[model.config.vision_feature_layer])
    ref["adapter"] = torch.stack([a[:n] for a in adapter])
    ref["llm.0"] = gather(out.hidden_states[0], pos)
    ref.update({f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(1, L)})
    ref[f"llm.{L}"] = gather(last_block, pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    return ref


REFERENCES = {
    "gemma3": gemma3_reference,
    "llava_next": llava_next_reference,
    "qwen2_vl": qwen_reference,
    "qwen2_5_vl": qwen_reference,
}


def patch_grid_module(vlm):
    """Per family: (module whose output is the vision patch grid, (B, P, D) -> (B, Pr, Pc, D)).

    The returned view must share memory with the module output, so that writing to the grid
    writes to the output.
    """
    if vlm.family.name == "gemma3":
        vision = vlm.model.config.vision_config
        side = vision.image_size // vision.patch_size
        module = vlm.model.model.vision_tower.post_layernorm
        return module, lambda h: h.view(h.shape[0], side, side, h.shape[-1])
    raise NotImplementedError(vlm.family.name)


def llava_next_crops(vlm) -> int:
    """1 + tiles: the base image and the tiles of the best resolution."""
    (h, w), S = vlm.family.best_resolution, vlm.geometry.size
    return 1 + (h // S) * (w // S)


def plant_llava_next(vlm, r: int, c: int):
    """Add 10 to the base crop's patch (r, c) in the feature the projector reads."""
    g, crops = vlm.grid[1], llava_next_crops(vlm)

    def plant(_m, args):
        h = args[0].clone()  # (B * crops, N, D): crop 0 of each image is its base image
        h[::crops, r * g + c] += 10.0
        return (h, *args[1:])

    return vlm.model.model.multi_modal_projector.register_forward_pre_hook(plant)


def edit_image_embeddings(vlm, edit):
    """Hook ``edit((B, N, D) -> (B, N, D))`` onto the LLM input embeddings of the image tokens.

    The tensor is in HF's scatter order (= sequence order). Returns the hook handle.
    """
    n = vlm.num_image_tokens
    if vlm.family.name == "llava_next":  # the projector runs per crop: crop 0 is the base image
        crops = llava_next_crops(vlm)

        def edit_base(_m, _a, out):
            out = out.clone()
            out[::crops] = edit(out[::crops])
            return out

        return vlm.model.model.multi_modal_projector.register_forward_hook(edit_base)
    if vlm.family.name in QWEN:  # the visual tower's pooler_output is what HF scatters

        def hook(_m, _a, out):
            x = out.pooler_output
            out.pooler_output = edit(x.reshape(-1, n, x.shape[-1])).reshape(x.shape)

        return vlm.model.model.visual.register_forward_hook(hook)

    def hook(_m, _a, out):
        return edit(out.reshape(-1, n, out.shape[-1])).reshape(out.shape)

    return vlm.model.model.multi_modal_projector.register_forward_hook(hook)


def record_image_embeddings(vlm, store: dict):
    def keep(x):
        store.setdefault("x", x.clone())
        return x

    return edit_image_embeddings(vlm, keep)


# --- tests --------------------------------------------------------------------------------------
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
    """A vector added to every patch of grid cell (r, c) lands on image slot r * g + c only."""
    batch = vlm.prepare(random_images(1))
    g_rows, g_cols = vlm.grid
    stages = ["encoder", "adapter", "llm.1"]
    clean = vlm.capture(batch, stages)
    for r, c in [(0, 0), (1, g_cols - 2), (g_rows - 1, 2)]:
        embeds = {}
        handles = [
            plant_at_cell(vlm, r, c, len(batch)),
            record_image_embeddings(vlm, embeds),
        ]
        try:
            planted = vlm.capture(batch, stages)
        finally:
            for h in handles:
                h.remove()
        k = r * g_cols + c
        changed = (planted["encoder"] - clean["encoder"]).abs().amax(-1)[0] > 1e-4
        assert changed.nonzero().flatten().tolist() == [k]
        changed = (planted["adapter"] - clean["adapter"]).abs().amax(-1)[0] > 1e-4
        assert changed.nonzero().flatten().tolist() == [k]
        assert torch.equal(planted["adapter"], embeds["x"])


def plant_at_cell(vlm, r: int, c: int, batch_size: int):
    """Hook adding 10 to every vision-tower output patch of grid cell (r, c); returns the handle.

    Gemma3: SigLIP's post-layernorm patch grid. Qwen: the last vision block's output, whose rows
    are the 2x2 units in vision-sequence order (window order in Qwen2.5-VL, undone with HF's
    window index): the unit of raster cell (r, c) is located independently of the family code.
    """
    g_rows, g_cols = vlm.grid
    if vlm.family.name in QWEN:
        k = r * g_cols + c

        def plant_unit(_m, _a, out):
            units = qwen_raster_units(vlm, torch.arange(out.shape[0]), batch_size)
            out = out.clone()
            # not a constant: the merger's LayerNorm would remove it
            signal = torch.linspace(-10.0, 10.0, out.shape[-1])
            out[units[:, k].flatten()] += signal  # the 4 patch rows of unit k in every image
            return out

        return vlm.model.model.visual.blocks[-1].register_forward_hook(plant_unit)
    if vlm.family.name == "llava_next":
        return plant_llava_next(vlm, r, c)
    module, as_grid = patch_grid_module(vlm)

    def plant(_m, _a, out):
        grid = as_grid(out.clone())
        pr, pc = grid.shape[1] // g_rows, grid.shape[2] // g_cols
        grid[:, r * pr : (r + 1) * pr, c * pc : (c + 1) * pc] += 10.0
        return grid.reshape(out.shape)

    return module.register_forward_hook(plant)


def perturbed(vlm, batch, j, specs=None):
    """Capture LLM stages with image slot j's input embedding bumped, under ``specs``."""

    def bump(x):
        x = x.clone()
        x[:, j] += 1.0
        return x

    handle = edit_image_embeddings(vlm, bump)
    try:
        return llm_stages(vlm, batch, specs)
    finally:
        handle.remove()


def llm_stages(vlm, batch, specs=None):
    stages = [f"llm.{i}" for i in range(1, vlm.num_llm_layers + 1)]
    if specs is None:
        return vlm.capture(batch, stages)
    with intervene(vlm, specs):
        return vlm.capture(batch, stages)


def earlier_slots_move(vlm, batch, specs=None) -> bool:
    """Bump image slot j; later slots must move. Return whether slots < j moved too."""
    j = vlm.num_image_tokens // 2
    base = llm_stages(vlm, batch, specs)
    bumped = perturbed(vlm, batch, j, specs)
    assert all(not torch.equal(base[s][:, j:], bumped[s][:, j:]) for s in base)
    return any(not torch.equal(base[s][:, :j], bumped[s][:, :j]) for s in base)


def test_perturbation_respects_image_attention(vlm, batch):
    """Natively bidirectional: earlier slots move, and stop moving under CausalImage."""
    native = vlm.family.native_image_attention
    assert native in ("causal", "bidirectional")
    assert earlier_slots_move(vlm, batch) == (native == "bidirectional")
    assert not earlier_slots_move(vlm, batch, [CausalImage()])
    assert earlier_slots_move(vlm, batch, [BidirectionalImage()])


def test_empty_spec_changes_nothing(vlm, batch):
    """intervene() starts from the family's own image block: [] and the native spec are no-ops."""
    ref = vlm.capture(batch)
    native = [BidirectionalImage()] if vlm.family.native_image_attention == "bidirectional" else []
    for specs in ([], native):
        with intervene(vlm, specs):
            got = vlm.capture(batch)
        for stage in ref:
            assert torch.equal(got[stage], ref[stage]), (specs, stage)


def test_knockout_keeps_the_native_image_block(vlm, batch):
    """A knockout of the last image slot leaves a bidirectional family bidirectional."""
    if vlm.family.native_image_attention != "bidirectional":
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
    if not vlm.family.hf_processor:
        pytest.skip("no HF processor without torchvision; see test_qwen_inputs_match_hf")
    from PIL import Image

    # LLaVA-NeXT's token count follows the image's own size; seglens feeds it the S x S model
    # input, so compare on an S x S image (there the processor's crops are seglens' too).
    S = vlm.geometry.size
    anyres = vlm.family.name == "llava_next"
    image = random_images(1, S, S)[0] if anyres else random_images(1)[0]
    batch = vlm.prepare([image])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.prompt}]}
    ]
    text = vlm.processor.apply_chat_template(conversation, add_generation_prompt=True)
    ref = vlm.processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == batch.input_ids[0].tolist()
    if anyres:
        got = vlm.family.model_inputs(batch.pixel_values)
        torch.testing.assert_close(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
        assert got["image_sizes"].tolist() == ref["image_sizes"].tolist()
    assert batch.pixel_values.shape[-2:] == (vlm.geometry.size, vlm.geometry.size)


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


# --- Qwen2-VL / Qwen2.5-VL: patch layout, M-RoPE inputs -----------------------------------------
@pytest.fixture(params=[f for f in FAMILIES if f.startswith("qwen")])
def qwen_vlm(request, family_models):
    return family_models(request.param)


def test_qwen_pixel_patch_lands_in_its_unit(qwen_vlm, random_images):
    """Pixels of patch (dr, dc) of merged cell (r, c) feed patch row 4 * (r * g + c) + 2 * dr + dc.

    The merger concatenates 4 consecutive patch rows into one token; so this pins the 2x2 block
    order of ``patchify`` against the model's own layout, and the cell -> raster slot map.
    """
    vlm = qwen_vlm
    batch = vlm.prepare(random_images(1))
    p, g = vlm.patch_size, vlm.grid[1]
    embed = vlm.model.model.visual.patch_embed
    rows = {}

    def embedded(pixel_values):
        handle = embed.register_forward_hook(lambda _m, _a, out: rows.setdefault("x", out))
        try:
            vlm.family.forward(batch.input_ids, pixel_values, batch.attention_mask)
        finally:
            handle.remove()
        return rows.pop("x")

    with torch.inference_mode():
        clean = embedded(batch.pixel_values)
        for r, c, dr, dc in [(0, 0, 0, 1), (1, g - 2, 1, 0), (g - 1, 2, 1, 1)]:
            pixels = batch.pixel_values.clone()
            y, x = (2 * r + dr) * p, (2 * c + dc) * p
            pixels[:, :, y : y + p, x : x + p] += 1.0
            changed = (embedded(pixels) - clean).abs().amax(-1) > 1e-6
            assert changed.nonzero().flatten().tolist() == [4 * (r * g + c) + 2 * dr + dc]


def test_qwen_inputs_match_hf(qwen_vlm, random_images):
    """Pixels equal the HF image processor's; tokens are the Qwen2VLProcessor layout."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    vlm = qwen_vlm
    S = vlm.geometry.size
    image = random_images(1, S, S)[0]  # already S x S: both resize paths are the identity
    batch = vlm.prepare([image])
    settings = vlm.processor.image_processor.to_dict()
    settings.pop("image_processor_type", None)
    ref = Qwen2VLImageProcessorPil(**settings)([Image.fromarray(image)], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [list(vlm.family.grid_thw)]
    inputs = vlm.family.model_inputs(batch.input_ids, batch.pixel_values, batch.attention_mask)
    torch.testing.assert_close(inputs["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    assert inputs["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    # Qwen2VLProcessor: <|vision_start|> + grid_thw.prod() / merge^2 image pads + <|vision_end|>
    tok = vlm.processor.tokenizer
    ids = batch.input_ids[0].tolist()
    n = int(ref["image_grid_thw"].prod()) // vlm.model.config.vision_config.spatial_merge_size**2
    start = ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1 : start + n + 2] == [vlm.image_token_id] * n + [
        tok.convert_tokens_to_ids("<|vision_end|>")
    ]
    assert batch.image_positions[0].tolist() == list(range(start + 1, start + n + 1))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_padding_mask_from_a_4d_mask(qwen_vlm, random_images, backend):
    """M-RoPE needs the 2D padding mask: it is recovered exactly from seglens' 4D masks."""
    from seglens.interventions import build_attention_mask
    from seglens.models.families.qwen2_vl import padding_mask_from

    batch = qwen_vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    specs = [Knockout(keys=TokenSet.from_slots([0, 1, 2])), BidirectionalImage()]
    mask = build_attention_mask(specs, batch, backend=backend)
    assert torch.equal(padding_mask_from(mask), batch.attention_mask)
    assert padding_mask_from(batch.attention_mask) is batch.attention_mask


def test_qwen_rejects_another_image_size(qwen_vlm, random_images):
    batch = qwen_vlm.prepare(random_images(1))
    with pytest.raises(ValueError, match="is set up for"):
        qwen_vlm.family.model_inputs(
            batch.input_ids, batch.pixel_values[..., :-28, :-28], batch.attention_mask
        )


# --- LLaVA-NeXT: tiles and newlines after the base grid -----------------------------------------
@pytest.mark.parametrize("pinpoints", [((112, 224),), ((224, 224),)])
def test_llava_next_sequence_layout(pinpoints, random_images):
    """Base g x g tokens first, then rows of tile tokens each closed by the newline embedding.

    (112, 224): one tile row of two tiles, centre-padded and unpadded by HF to g x g; (224, 224):
    2 x 2 tiles of the upsampled input, 2g x 2g. HF itself checks the placeholder count.
    """
    from seglens.models import tiny_model

    vlm = tiny_model("llava_next", grid_pinpoints=pinpoints)
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    rows, cols = vlm.family.tile_grid
    g, n = vlm.grid[0], vlm.num_image_tokens
    assert (rows, cols) == ((g, g) if pinpoints[0][1] != pinpoints[0][0] else (2 * g, 2 * g))
    inputs = {}

    def keep(_m, args, kwargs):
        inputs.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = vlm.family.decoder_layers()[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        got = vlm.capture(batch, ["adapter", "llm.1"])
    finally:
        handle.remove()
    newline = vlm.model.model.image_newline
    for b in range(2):
        placeholders = (batch.input_ids[b] == vlm.image_token_id).nonzero().flatten()
        assert len(placeholders) == n + rows * (cols + 1)
        assert torch.equal(placeholders[:n], batch.image_positions[b])
        embeds = inputs["x"][b]
        assert torch.equal(embeds[batch.image_positions[b]], got["adapter"][b])
        ends = placeholders[n + cols :: cols + 1]
        assert len(ends) == rows
        assert torch.equal(embeds[ends], newline.expand(rows, -1))
        tiles = placeholders[n:][(torch.arange(rows * (cols + 1)) % (cols + 1)) != cols]
        assert not (embeds[tiles] == newline).all(-1).any()
    # the HF path on the same crops gives the same base tokens
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(**vlm.family.model_inputs(batch.pixel_values))
    assert torch.equal(torch.stack([f[:n] for f in feats.pooler_output]), got["adapter"])
