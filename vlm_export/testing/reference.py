"""transformers-side reference objects for parity tests and tools (torch + transformers required)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def processor_class_for(model_type: str) -> Any:
    """transformers' processor class for `model_type`, from its own auto mapping."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])


def vl_processor(
    model_dir: str | Path, processor_class: Any, padding_side: str = "left", video_processor: Any = None
) -> Any:
    """transformers' own Qwen-VL processor (`processor_class`) with the PIL image processor and `video_processor`
    (none by default; pass e.g. ``AutoVideoProcessor.from_pretrained(model_dir)``, which needs torchvision).

    transformers 5.24 refuses to build these processors without torchvision (its argument check looks up the
    video processor class, which is a placeholder then). Images never touch the video processor, so the check
    is skipped for this one construction; every processing step that runs is transformers' own code.
    """
    import json

    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side=padding_side)
    # Scalar processor settings (LLaVA-OneVision's num_image_tokens, vision_feature_select_strategy, ...).
    settings: dict[str, Any] = {}
    config_file = Path(model_dir) / "processor_config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text(encoding="utf-8"))
        skip = {"processor_class", "chat_template", "image_processor", "video_processor", "tokenizer"}
        settings = {k: v for k, v in data.items() if k not in skip and not isinstance(v, dict)}
    image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    original = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=tokenizer.chat_template,
            **settings,
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def qwen2_5_vl_processor(model_dir: str | Path, padding_side: str = "left") -> Any:
    from transformers import Qwen2_5_VLProcessor

    return vl_processor(model_dir, Qwen2_5_VLProcessor, padding_side)
