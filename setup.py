"""Package layout (the metadata is in pyproject.toml): every ``avkv*`` package, plus the clone's ``configs/`` and
``results/papers/`` shipped as the package data folders ``avkv/configs`` and ``avkv/papers``, so ``pip install .``
gives a runnable ``avkv run`` (``avkv.config`` finds them there when it is not in a clone)."""
from setuptools import find_packages, setup

packages = find_packages(include=["avkv", "avkv.*"])
setup(
    packages=[*packages, "avkv.configs", "avkv.papers"],
    package_dir={"avkv.configs": "configs", "avkv.papers": "results/papers"},
    package_data={
        # data beside the code (templates, metric tables) in any subpackage, and the committed proxy checkpoints
        "avkv": ["**/*.json", "**/*.jinja", "**/*.txt", "models/proxy_checkpoints/**/*"],
        "avkv.configs": ["*.yaml", "**/*.yaml"],
        "avkv.papers": ["*.csv", "**/*.csv"],
    },
    include_package_data=False,
)
