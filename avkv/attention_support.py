"""Which methods can run under ``model.attn_implementation=flash_attention_2``, checked before any model loads.

Two things a method may need that flash-attn cannot give:

* **attention weights** (``requires_attentions``): only eager attention materialises them;
* **avkv's masked attention**: once compression leaves caches whose lengths differ across layers or KV heads
  (per-layer budgets, per-head budgets stored ragged, FastV's pruning from layer K, D2O's layer allocation), every
  later forward goes through ``avkv_masked`` (``avkv/engine.py``), which passes an additive per-layer / per-head
  bias to the model's base kernel. transformers' flash-attn path takes no such bias (its mask is a padding mask),
  so these methods need ``sdpa`` or ``eager``.

:data:`VARYING_CACHE` lists the method classes of the second kind, measured: every method config on the 8-layer
tiny Omni model at budgets 0.5 and 0.2 (``tests/methods/test_attention_support.py`` fails when a method switches
the engine to the masked attention without being listed). SimLayerKV and PerLayerCompression are listed although
their default configs stay uniform there: which layers they compress depends on the data and the per-layer ratios.
"""
from __future__ import annotations

#: class names (anywhere in a method's MRO) whose compressed caches can differ in length across layers or heads
VARYING_CACHE = ("HeadAllocation", "LayerAllocation", "AudioKV", "MadaKV", "CriticalAdaKV", "D2O", "FastV", "KVzip",
                 "SimLayerKV", "PerLayerCompression")
#: attributes of wrapper/composite methods that hold the methods they run
_INNER = ("scorer", "press", "base", "methods")


def method_parts(method) -> list:
    """The method and every method nested in it (wrappers' scorers, Composed's stages)."""
    out, todo = [], [method]
    while todo:
        m = todo.pop()
        if any(m is o for o in out):
            continue
        out.append(m)
        for name in _INNER:
            inner = getattr(m, name, None)
            for x in inner if isinstance(inner, (list, tuple)) else [inner]:
                if x is not None and hasattr(x, "compress"):
                    todo.append(x)
    return out


def varying_cache(method) -> bool:
    """True when ``method`` (or a method inside it) can leave caches of different lengths across layers or heads."""
    return any(c.__name__ in VARYING_CACHE for m in method_parts(method) for c in type(m).__mro__)


def attention_problem(method, attn_implementation: str) -> str | None:
    """Why ``method`` cannot run under ``attn_implementation``, or None when it can."""
    name = getattr(method, "name", type(method).__name__)
    if getattr(method, "requires_attentions", False) and attn_implementation != "eager":
        return f"method {name!r} reads attention weights: it needs model.attn_implementation=eager"
    if attn_implementation == "flash_attention_2" and varying_cache(method):
        return (f"method {name!r} leaves caches whose lengths differ across layers or KV heads; they decode "
                "through avkv's masked attention, which flash-attn cannot take: use model.attn_implementation=sdpa "
                "(or eager)")
    return None
