"""KV-compression methods, one file each. ``base.py`` holds the contract and the shared primitives."""
from avkv.methods.base import LayerView, Method, ScoreMethod, Selection

#: avkv methods that reproduce a kvpress press (config name → (kvpress class, kvpress version)); docs/methods.md
#: and the parity suite (tests/parity) follow this list
KVPRESS_PRESSES = {
    "expected_attention": ("ExpectedAttentionPress", "0.5.5"),
    "lagkv": ("LagKVPress", "0.5.5"),
    "chunkkv": ("ChunkKVPress", "0.5.5"),
    "cur": ("CURPress", "0.5.5"),
    "compactor": ("CompactorPress", "0.5.5"),
    "finch": ("FinchPress", "0.5.5"),
    "simlayerkv": ("SimLayerKVPress", "0.5.5"),
    "criticalkv": ("CriticalKVPress", "0.5.5"),
    "criticaladakv": ("CriticalAdaKVPress", "0.5.5"),
    "block": ("BlockPress", "0.5.5"),
    "chunk": ("ChunkPress", "0.5.5"),
    "composed": ("ComposedPress", "0.5.5"),
    "per_layer_compression": ("PerLayerCompressionPress", "0.5.5"),
    "key_rerotation": ("KeyRerotationPress", "0.5.5"),
    "decoding": ("DecodingPress", "0.5.5"),
    "kvzip": ("KVzipPress", "0.5.5"),
}

__all__ = ["LayerView", "Method", "ScoreMethod", "Selection", "KVPRESS_PRESSES"]
