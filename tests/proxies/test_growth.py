"""Growing a trained proxy's decoder (``scripts/train_proxy.py --grow``) and carrying embeddings across a changed
tokenizer: the two warm starts the committed proxies were made with."""
from __future__ import annotations

import json

import pytest
import torch

from tests.proxies.test_generator import _train_script


@pytest.fixture(scope="module")
def shallow_and_deep(tmp_path_factory):
    from avkv.models.qwen2_audio import build_tiny
    root = tmp_path_factory.mktemp("grow")
    build_tiny(root / "l2", seed=1, layers=2)
    build_tiny(root / "l4", seed=2, layers=4)          # another seed: every decoder tensor differs at first
    return root / "l2", root / "l4"


def _logits(folder, ids):
    from transformers import Qwen2AudioForConditionalGeneration
    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["zero", "split"])
def test_grown_decoder_starts_from_the_shallow_one(shallow_and_deep, tmp_path, mode):
    """``zero``: the grown model computes exactly what the shallow one did (the extra copies write nothing into
    the residual stream); ``split``: the copies share the work, which changes the function."""
    import shutil
    shallow, deep = shallow_and_deep
    grown = tmp_path / "grown"
    shutil.copytree(deep, grown)
    rec = _train_script().warm_start(grown, shallow, grow=mode)
    assert rec["source_layer_of"] == [0, 0, 1, 1] and not rec["skipped"]
    ids = torch.randint(20, 600, (2, 12))
    before, after = _logits(shallow, ids), _logits(grown, ids)
    if mode == "zero":
        assert torch.allclose(before, after, atol=1e-5)
    else:
        assert not torch.allclose(before, after, atol=1e-3)


def _tokenizer(folder, vocab: dict[str, int], added: dict[str, int]) -> None:
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": vocab}, "added_tokens": [{"content": k, "id": v} for k, v in added.items()]}))


def test_embedding_rows_follow_their_token_across_tokenizers(tmp_path):
    """A new question type retrains the proxies' tokenizer: a token keeps its row wherever its id moved; a new
    token (-1) keeps its fresh initialisation."""
    train = _train_script()
    _tokenizer(tmp_path / "old", {"a": 0, "b": 1, "ab": 2}, {"<|im_end|>": 3})
    _tokenizer(tmp_path / "new", {"b": 0, "a": 1, "ba": 2}, {"<|im_end|>": 3})
    assert train.token_rows(tmp_path / "old", tmp_path / "new").tolist() == [1, 0, -1, 3]
    assert train.token_rows(tmp_path / "old", tmp_path / "old") is None


def test_warm_start_across_tokenizers_keeps_each_tokens_embedding(shallow_and_deep, tmp_path):
    from safetensors.torch import load_file

    from avkv.models.qwen2_audio import build_tiny
    shallow, _ = shallow_and_deep
    build_tiny(tmp_path / "t", seed=3, layers=2, texts=["Which colour flashes most often?"])
    train = _train_script()
    old_vocab, new_vocab = train._vocab(shallow), train._vocab(tmp_path / "t")
    assert old_vocab != new_vocab
    rec = train.warm_start(tmp_path / "t", shallow)
    assert rec["new_tokens"] > 0
    old, new = load_file(shallow / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    name = "language_model.model.embed_tokens.weight"
    shared = [t for t in new_vocab if t in old_vocab and old_vocab[t] != new_vocab[t]]
    assert shared                                           # some tokens moved
    for t in shared:
        assert torch.equal(new[name][new_vocab[t]], old[name][old_vocab[t]])
        assert torch.equal(new["language_model.lm_head.weight"][new_vocab[t]],
                           old["language_model.lm_head.weight"][old_vocab[t]])
