"""KV-compression methods, one file each. ``base.py`` holds the contract and the shared primitives."""
from avkv.methods.base import LayerView, Method, ScoreMethod, Selection

__all__ = ["LayerView", "Method", "ScoreMethod", "Selection"]
