"""Host syncs per batch, counted on a tiny model whose weights and activations live on a virtual
``cuda:0`` (``tests/virtual_cuda.py`` counts ``.item()``/``bool()``, ``.tolist()``, copies to
the CPU, ``nonzero``, boolean-mask indexing, ``bincount``...), so the counts cannot creep back:
evaluation adds a fixed few per batch to the forward's own (not a few per stage and image),
probing one, the attention analysis one per batch (not two per layer)."""

from __future__ import annotations

import pytest
import torch

from seglens.analyses.attention import measure as attention
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset
from seglens.experiments.evaluation import evaluate_probes
from seglens.experiments.streaming import stream_batches
from seglens.probes import ProbeBank
from virtual_cuda import virtual_cuda

B, BATCHES, C = 2, 1, 6


def _to_device(model: torch.nn.Module, device: str) -> None:
    """Every parameter and buffer onto a virtual device (``Module.to`` would re-wrap them as
    ``Parameter``s, which drops the virtual tensor)."""
    with torch.inference_mode():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, value in table.items():
                    if value is not None:
                        table[name] = value.detach().to(device)


@pytest.mark.slow  # ~15 s: every op of a tiny forward goes through the counting mode
def test_host_syncs_per_batch():
    from seglens.models import tiny_llava

    vlm = tiny_llava("clip", image_size=112)
    stages = list(vlm.default_stages)
    data = DataConfig(batch_size=B)
    evaluation = SyntheticDataset(num_images=B * BATCHES, num_classes=C, split="val")
    with virtual_cuda(1) as mode:
        _to_device(vlm.model, "cuda:0")
        assert vlm.device == torch.device("cuda:0")
        batches = list(stream_batches(vlm, evaluation, data, C, {}, False, "syncs"))

        def per_batch(run) -> float:
            before = mode.total
            run()
            return (mode.total - before) / BATCHES

        forward = per_batch(lambda: [vlm.capture(b, stages) for b in batches])
        bank = ProbeBank(stages, C, solver="lda")
        probing = per_batch(
            lambda: [bank.partial_fit(vlm.capture(b, stages), b.labels) for b in batches]
        )
        bank.select()

        def evaluate(pixel_level: bool) -> float:
            cfg = ProbeConfig(solver="lda", bootstrap=0, qualitative=0, pixel_level=pixel_level)
            return per_batch(
                lambda: evaluate_probes(
                    vlm, bank, evaluation, stages, cfg, data_config=data, progress=False
                )
            )

        patch, pixel = evaluate(False), evaluate(True)
        layers = vlm.family.decoder_layers()
        probe = bank.probes["adapter"]

        def measure() -> None:
            for b in batches:
                labels = b.labels.numpy()
                got = attention.predict_stages(vlm, b, {"adapter": probe}, masked=False)
                plan = attention.query_plan(b, labels, got[0] == labels, (0, 1))
                with attention.measure_attention(layers, plan, b.attention_mask.bool()) as out:
                    vlm.capture(b, [f"llm.{len(layers)}"])
                torch.stack([torch.stack(o) for o in out]).cpu()  # as ``_measure_pair`` reads

        attend = per_batch(measure)
    # On d427a59 (6 stages, B = 4): evaluation 231 (patch) / 305 (pixel), attention 15.
    assert forward == 2  # transformers' own checks inside the forward
    assert probing == forward + 1  # the bank's one input check
    assert patch == forward + 2  # the input check and the one copy of all counts
    # Pixel level: the exact upsampler prunes classes per image (a few data-dependent sizes).
    assert patch < pixel <= patch + 6 * B
    assert attend <= 2 * forward + 2  # the reference predictions and the shares: one copy each
    print(f"syncs per batch: forward {forward}, probing {probing}, evaluation patch {patch}, ")
    print(f"pixel {pixel}, attention {attend} ({len(stages)} stages, {B} images per batch)")
