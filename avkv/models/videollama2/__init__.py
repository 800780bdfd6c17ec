"""Native VideoLLaMA2 / VideoLLaMA2.1(-AV) port on transformers v5 (no original repository needed)."""
from avkv.models.videollama2.adapter import VideoLLaMA2Adapter
from avkv.models.videollama2.config import VideoLLaMA2Config
from avkv.models.videollama2.modeling import (CheckpointKeyError, VideoLLaMA2ForCausalLM, from_pretrained,
                                              load_official_weights, official_state_dict)
from avkv.models.videollama2.tiny import build_tiny

__all__ = ["VideoLLaMA2Adapter", "VideoLLaMA2Config", "VideoLLaMA2ForCausalLM", "CheckpointKeyError",
           "from_pretrained", "load_official_weights", "official_state_dict", "build_tiny"]
