"""Phi-3.5-vision (and Phi-3-vision) for current transformers, without remote code.

`import phi3v` registers the classes for model_type ``phi3_v`` with transformers' Auto classes, so
that the official checkpoint folders (or hub ids) load with the usual calls:

    import phi3v  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained("microsoft/Phi-3.5-vision-instruct", dtype="auto")
    processor = AutoProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct", num_crops=4)

`AutoModelForImageTextToText` loads the same class, so `pipeline("image-text-to-text", model=...)` works.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.models.auto.video_processing_auto import AutoVideoProcessor  # the top-level name needs torchvision

from .configuration_phi3_v import Phi3VConfig
from .modeling_phi3_v import Phi3VForCausalLM, Phi3VModel
from .packing import pack_examples
from .processing_phi3_v import Phi3VImageProcessor, Phi3VProcessor, num_image_tokens
from .training import fix_4bit_cpu_gradients, last_complete_checkpoint, lora_target_modules

AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModel.register(Phi3VConfig, Phi3VModel, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, slow_image_processor_class=Phi3VImageProcessor, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)
# No video processor (the processor takes frames as images). Said explicitly because the official
# preprocessor_config.json names remote code: without a local entry, the video processor that
# pipeline("image-text-to-text") probes for would ask interactively whether to trust that code.
AutoVideoProcessor.register(Phi3VConfig, None, exist_ok=True)

__all__ = [
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VModel",
    "Phi3VImageProcessor",
    "Phi3VProcessor",
    "num_image_tokens",
    "pack_examples",
    "lora_target_modules",
    "fix_4bit_cpu_gradients",
    "last_complete_checkpoint",
]
