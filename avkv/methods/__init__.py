"""KV-compression methods, one file each. ``base.py`` holds the contract and the shared primitives. A method that
reproduces a kvpress press says which on its class (``Method.kvpress``); the tests and the parity suite find the
ports from it."""
from avkv.methods.base import LayerView, Method, ScoreMethod, Selection

__all__ = ["LayerView", "Method", "ScoreMethod", "Selection"]
