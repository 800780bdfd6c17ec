"""avkv: KV-cache compression harness for audio/video LLMs."""
