"""The trained proxy models: built from the models' tiny builders and trained on the synthetic AVQA-layout data of
:mod:`avkv.tasks.fixtures.proxy`. This package sits above both layers (it imports models and tasks; neither imports
it), so a model module never reaches into the task layer. :mod:`avkv.proxies.build` holds the proxy table."""
