"""The logit lens equals the model's own logits at ``llm.L`` on the class rows, for every family
with an LM head (tied or not, soft-capped or not); class tokens, synonyms and collisions."""

from __future__ import annotations

import pytest
import torch

from family_checks import cached_model, gather
from seglens.data.datasets import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    COCO_STUFF_CLASSES,
    VOC_CLASSES,
)
from seglens.models import registry
from seglens.readouts.classtokens import (
    SYNONYM_DATASETS,
    class_synonyms,
    class_tokens,
    name_tokens,
    shipped_synonyms,
)
from seglens.readouts.lens import NEG, Lens, lens_stages, present_classes, restrict
from test_families import REFERENCES, shared_check_models

NAMES = ["wall", "sky", "floor", "tree", "person", "car", "water", "grass"]


def _tokens(vlm, names=NAMES, mode="first"):
    return class_tokens(vlm.processor.tokenizer, [[n] for n in names], names, mode)


def _model_logits(vlm, batch) -> tuple[torch.Tensor, dict]:
    """The HF model's own (B, T, V) logits, from its own top-level forward (the family's
    reference path), and that path's stages."""
    seen = []
    handle = vlm.model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits))
    try:
        ref = REFERENCES[vlm.family.name](vlm, batch)
    finally:
        handle.remove()
    return seen[0], ref


@pytest.mark.parametrize("name", shared_check_models())
def test_lens_at_last_layer_equals_model_logits(name, random_images):
    vlm = cached_model(name)
    batch = vlm.prepare(random_images(2))
    L = vlm.num_llm_layers
    tokens = _tokens(vlm)
    lens = Lens(vlm, tokens)
    logits, ref = _model_logits(vlm, batch)
    state = vlm.capture(batch, [f"llm.{L}"])[f"llm.{L}"]
    assert torch.equal(state, ref[f"llm.{L}"])
    own = gather(logits, batch.image_positions)  # (B, N, V)
    entries = lens.entry_logits(state)  # (B, N, E): first mode, one row per class name
    rows = [ids[0] for _, _, ids in tokens.entries]
    torch.testing.assert_close(entries, own[..., rows], rtol=1e-5, atol=1e-5)
    # Class scores are the best entry of each class: the argmax over the model's class rows.
    z = lens.logit_lens(state)
    best = torch.stack(
        [
            own[..., [ids[0] for c2, _, ids in tokens.entries if c2 == c]].max(-1).values
            for c in range(len(NAMES))
        ],
        -1,
    )
    torch.testing.assert_close(z, best, rtol=1e-5, atol=1e-5)


def test_tied_and_untied_heads_are_both_covered():
    tied = set()
    for name in shared_check_models():
        family = cached_model(name).family
        tied.add(family.unembedding().weight is family.input_embeddings().weight)
    assert tied == {True, False}


def test_softcapped_logits_equal_the_model(random_images):
    """PaliGemma soft-caps its logits when the text config asks: the lens does the same."""
    vlm = cached_model("tiny-paligemma")
    text = vlm.model.config.get_text_config()
    batch = vlm.prepare(random_images(1))
    L = vlm.num_llm_layers
    old = getattr(text, "final_logit_softcapping", None)
    text.final_logit_softcapping = 0.5  # small: tanh bends the logits visibly
    try:
        assert vlm.family.logit_softcap == 0.5
        lens = Lens(vlm, _tokens(vlm))
        logits, _ = _model_logits(vlm, batch)
        state = vlm.capture(batch, [f"llm.{L}"])[f"llm.{L}"]
        rows = [ids[0] for _, _, ids in lens.tokens.entries]
        own = gather(logits, batch.image_positions)[..., rows]
        assert own.abs().max() < 0.5  # really capped
        torch.testing.assert_close(lens.entry_logits(state), own, rtol=1e-5, atol=1e-5)
    finally:
        text.final_logit_softcapping = old


def test_mean_mode_is_the_mean_of_the_sub_token_logits(random_images):
    vlm = cached_model("tiny-clip")
    names = ["dog", "sky"]  # byte tokens, no repeated letter
    batch = vlm.prepare(random_images(1))
    state = vlm.capture(batch, ["llm.2"])["llm.2"]
    first = Lens(vlm, _tokens(vlm, names, "max"))  # one entry per sub-token
    mean = Lens(vlm, _tokens(vlm, names, "mean"))
    per_token = first.entry_logits(state)
    for e, (c, _, ids) in enumerate(mean.tokens.entries):
        cols = [k for k, (c2, _, i2) in enumerate(first.tokens.entries) if c2 == c]
        assert len(cols) == len(ids) == 3
        torch.testing.assert_close(
            mean.entry_logits(state)[..., e], per_token[..., cols].mean(-1), rtol=1e-5, atol=1e-5
        )


def test_embedding_lens_reads_the_input_embedding_of_the_token():
    """A state equal to class c's input embedding (any positive scale: Gemma scales by sqrt(D))
    is read as c by the embedding lens."""
    vlm = cached_model("tiny-gemma3")
    tokens = _tokens(vlm, ["sky", "wall", "person"])
    lens = Lens(vlm, tokens)
    table = vlm.family.input_embeddings().weight
    rows = [ids[0] for _, _, ids in tokens.entries]
    h = (table[rows] * 7.0)[None]  # (1, 3, D)
    z = lens.embedding_lens(h)
    assert z.argmax(-1).tolist() == [[0, 1, 2]]
    torch.testing.assert_close(z.diagonal(dim1=-2, dim2=-1), torch.ones(1, 3))


def test_class_tokens_first_sub_token_without_specials():
    tok = cached_model("tiny-clip").processor.tokenizer
    ids = name_tokens(tok, "chest of drawers")
    assert tok.decode(ids).strip() == "chest of drawers".replace(" ", "")  # byte tokens, spaces off
    assert all(i not in tok.all_special_ids for i in ids)
    tokens = class_tokens(tok, [["chest"], ["chair"], ["sky"]], ["chest", "chair", "sky"])
    # A byte tokenizer reads the first letter: chest and chair collide, sky does not.
    assert [(a, b) for a, b, _ in tokens.collisions] == [("chest", "chair")]
    out = tokens.to_dict(tok)
    assert out["collisions"][0]["tokens"] == ["c"]


def test_organism_tokens_are_its_words():
    from seglens.data.organism import CLASS_NAMES

    vlm = cached_model("organism")
    tokens = class_tokens(vlm.processor.tokenizer, [[n] for n in CLASS_NAMES], list(CLASS_NAMES))
    words = vlm.processor.tokenizer.convert_ids_to_tokens([ids[0] for _, _, ids in tokens.entries])
    assert words == list(CLASS_NAMES)
    assert not tokens.collisions and not tokens.unreadable


def test_unknown_words_make_a_class_unreadable():
    tok = cached_model("organism").processor.tokenizer
    tokens = class_tokens(tok, [["dots", "spots"], ["zebra"]], ["dots", "zebra"])
    assert tokens.unreadable == ["zebra"]
    assert [name for _, name, _ in tokens.entries] == ["dots"]


def test_synonym_files_match_the_datasets():
    shipped = {"ade20k": ADE20K_CLASSES, "voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}
    shipped["coco-stuff"] = COCO_STUFF_CLASSES
    assert set(shipped) == set(SYNONYM_DATASETS)
    for dataset, names in shipped.items():
        lists = class_synonyms(list(names), dataset)
        assert [x[0] for x in lists] == list(names)
        owner: dict[str, int] = {}
        for c, synonyms in enumerate(lists):
            for s in synonyms:  # a name reads one class only
                assert owner.setdefault(s, c) == c, (dataset, s)


def test_synonym_file_order_mismatch_is_an_error():
    names = list(VOC_CLASSES)
    names[3], names[4] = names[4], names[3]
    with pytest.raises(ValueError, match="first differ at class 3"):
        class_synonyms(names, "voc")


def test_folder_class_names_split_at_commas():
    assert class_synonyms(["sofa, couch", "sky"], "folder") == [["sofa", "couch"], ["sky"]]
    assert shipped_synonyms("folder") is None


def test_bad_mode_is_an_error():
    tok = cached_model("tiny-clip").processor.tokenizer
    with pytest.raises(ValueError, match="sub-token mode 'last' is not one of"):
        class_tokens(tok, [["sky"]], ["sky"], "last")


def test_lens_stages_and_present_mode():
    stages = ["encoder", "vision.1", "adapter", "llm.1", "llm.2", "llm.final_norm"]
    assert lens_stages(stages) == ["adapter", "llm.1", "llm.2"]
    masks = [torch.tensor([[0, 2], [255, 2]]).numpy(), torch.tensor([[1, 1], [1, 1]]).numpy()]
    present = present_classes(masks, 3)
    assert present.tolist() == [[True, False, True], [False, True, False]]
    z = restrict(torch.zeros(2, 4, 3), present)
    assert (z[0, :, 1] == NEG).all() and (z[1, :, 0] == NEG).all() and (z[1, :, 1] == 0).all()


def test_every_family_has_an_lm_head():
    for name in shared_check_models():
        assert cached_model(name).family.unembedding() is not None, name
    assert len(shared_check_models()) == len(
        [n for n, s in registry().tiny.items() if not s.family_options]
    )


def test_sentencepiece_style_tokens_skip_the_bare_word_boundary():
    """A Llama-style tokenizer may give " chair" a lone "▁" first: it is not the class token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "▁chair": 2, "▁chest": 3, "▁of": 4, "▁drawers": 5}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert tok("  chair", add_special_tokens=False)["input_ids"] == [1, 2]  # a lone boundary
    assert name_tokens(tok, " chair") == [2]
    assert name_tokens(tok, "chest of drawers") == [3, 4, 5]
    tokens = class_tokens(tok, [["chest of drawers", "chest"], ["chair"]], ["chest", "chair"])
    assert [ids for _, _, ids in tokens.entries] == [(3,), (2,)]  # the duplicate entry is merged
    assert not tokens.collisions
