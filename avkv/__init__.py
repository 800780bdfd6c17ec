"""avkv: KV-cache compression harness for audio/video LLMs.

Command line: ``avkv run method=snapkv budget=0.2`` (Hydra overrides), ``avkv report runs/``. From Python::

    import avkv
    summary = avkv.run(["method=snapkv", "budget=0.2"])      # one experiment, written to the results store
    h = avkv.Harness(model="proxy_av")                        # load a model once ...
    df = h.run(method="snapkv", budget=0.2, dataset="proxy_av", limit=8)   # ... records as a DataFrame

Heavy modules (torch, transformers) load on first use, so ``import avkv`` stays cheap.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "run", "compose", "Harness", "collect"]


def __getattr__(name: str):
    if name in ("run", "Harness"):
        from avkv import api
        return getattr(api, name)
    if name == "compose":
        from avkv.config import compose
        return compose
    if name == "collect":
        from avkv.report import collect
        return collect
    raise AttributeError(f"module 'avkv' has no attribute {name!r}")
