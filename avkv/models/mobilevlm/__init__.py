"""MobileVLM V2 (Meituan-AutoML/MobileVLM): a native port on transformers v5 classes that loads the official
checkpoint layout by its own tensor names (no remote code)."""
from avkv.models.mobilevlm.adapter import MobileVLMAdapter
from avkv.models.mobilevlm.config import MobileVLMConfig
from avkv.models.mobilevlm.modeling import CheckpointKeyError, MobileVLMForCausalLM, from_pretrained
from avkv.models.mobilevlm.tiny import build_tiny

__all__ = ["CheckpointKeyError", "MobileVLMAdapter", "MobileVLMConfig", "MobileVLMForCausalLM", "build_tiny",
           "from_pretrained"]
