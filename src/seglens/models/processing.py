"""A processor made of a tokenizer and an image-processor config, for families without a usable one.

Some HF processors cannot be built here (``Qwen2VLProcessor`` needs torchvision for its video
processor). seglens needs only the tokenizer (chat template, special tokens), the image token and
the normalisation from ``preprocessor_config.json``; ``TextImageProcessor`` carries exactly those
and ``load_text_image_processor`` reads them from a checkpoint folder or hub id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ImageProcessorConfig(dict):
    """An image processor's saved settings (``preprocessor_config.json``) as a plain dict."""

    def to_dict(self) -> dict:
        return dict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "preprocessor_config.json", "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True, default=_jsonable)


def _jsonable(value):
    if hasattr(value, "value"):  # enums such as PIL's Resampling
        return value.value
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot save {type(value).__name__} in preprocessor_config.json")


class TextImageProcessor:
    """Tokenizer + image-processor settings + image token: what ``seglens`` uses of a processor.

    Attributes:
        tokenizer: the HF tokenizer (with the chat template).
        image_processor: an object with ``to_dict()`` and ``save_pretrained()`` (an HF image
            processor or an ``ImageProcessorConfig``).
        image_token: the placeholder the chat template renders where the image goes.
    """

    def __init__(self, tokenizer, image_processor, image_token: str, chat_template: str | None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.chat_template = chat_template or tokenizer.chat_template
        if not self.chat_template:
            raise ValueError(
                "the tokenizer has no chat template and none was given; save one with the "
                "tokenizer (chat_template.jinja) or the processor (chat_template.json)"
            )

    def apply_chat_template(self, conversation, **kwargs):
        """The tokenizer's ``apply_chat_template`` with this processor's template."""
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, **kwargs
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the tokenizer (with its chat template) and ``preprocessor_config.json``."""
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)


def load_text_image_processor(
    name_or_path: str, image_token: str, *, trust_remote_code: bool = False
) -> TextImageProcessor:
    """Tokenizer and image-processor settings of a checkpoint, without building its HF processor.

    Args:
        name_or_path: checkpoint folder or hub id.
        image_token: the placeholder to use when the tokenizer does not name one.
        trust_remote_code: passed to the tokenizer.
    """
    from transformers import AutoTokenizer
    from transformers.image_processing_base import ImageProcessingMixin

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    image_cfg, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    template = tokenizer.chat_template or _processor_chat_template(name_or_path)
    token = getattr(tokenizer, "image_token", None) or image_token
    return TextImageProcessor(tokenizer, ImageProcessorConfig(image_cfg), token, template)


def _processor_chat_template(name_or_path: str) -> str | None:
    """The processor-level ``chat_template.json`` (older checkpoints keep it there), if any."""
    from transformers.utils import cached_file

    path = cached_file(
        name_or_path,
        "chat_template.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("chat_template")
