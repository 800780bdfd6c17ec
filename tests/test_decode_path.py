"""The one decode path (issue 18 item 3): every storage (dense, per-layer lengths, ragged heads, the masked
reference) converts to a preallocated cache at the end of the prefill and decodes through one attention function.
Its tokens equal the growing cache's (the path before it), its buffers are written in place, and its attention
equals the storage-specific attention it replaces."""
import pytest
import torch

from avkv.attention import decode_attention, masked_attention
from avkv.engine import Engine
from avkv.kvstore import RaggedLayer
from avkv.prealloc import PreallocLayer
from avkv.methods.adakv import AdaKV
from avkv.methods.full import Full
from avkv.methods.pyramidkv import PyramidKV
from avkv.methods.snapkv import SnapKV
from tests.conftest import adapter, family_prompt

MAX_NEW = 10


class _Module:                        # what the attention functions read from a decoder attention module
    def __init__(self, scaling, layer=None, ragged=None, valid=None, groups=1):
        self.scaling, self._avkv_decode_layer = scaling, layer
        if ragged is not None:
            self._avkv_ragged = ragged
        if valid is not None:
            self._avkv_valid = valid
        self._avkv_base_impl = "sdpa"
        self.num_key_value_groups = groups
        self.training, self.is_causal = False, True


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q", [1, 3])
def test_ragged_heads_attend_as_ragged_layer(q):
    """Heads of different lengths padded into the buffer attend exactly as the unpadded ragged segments."""
    kvH, g, D, lens = 2, 3, 8, [5, 9]
    ks = [_rand(n, D, seed=h) for h, n in enumerate(lens)]
    vs = [_rand(n, D, seed=10 + h) for h, n in enumerate(lens)]
    newk, newv, query = _rand(1, kvH, q, D, seed=20), _rand(1, kvH, q, D, seed=21), _rand(1, kvH * g, q, D, seed=22)
    ragged = RaggedLayer([k.clone() for k in ks], [v.clone() for v in vs])
    pre = PreallocLayer.from_layer(RaggedLayer(ks, vs), extra=4)
    k1, v1 = ragged.update(newk, newv)
    k2, v2 = pre.update(newk, newv)
    assert pre.lengths.tolist() == [[n + q for n in lens]]
    ref, _ = masked_attention(_Module(D ** -0.5, ragged=ragged, groups=g), query, k1, v1, None)
    out, _ = decode_attention(_Module(D ** -0.5, layer=pre), query, k2, v2, None)
    assert out.shape == ref.shape == (1, q, kvH * g, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_masked_reference_attends_as_masked_attention():
    kvH, g, D, S = 2, 2, 8, 12
    K, V, query = _rand(1, kvH, S, D), _rand(1, kvH, S, D, seed=1), _rand(1, kvH * g, 1, D, seed=2)
    valid = _rand(kvH, S, seed=3) > 0
    valid[:, 0] = True
    newk, newv = _rand(1, kvH, 1, D, seed=4), _rand(1, kvH, 1, D, seed=5)
    ref_k, ref_v = torch.cat([K, newk], 2), torch.cat([V, newv], 2)
    ref, _ = masked_attention(_Module(D ** -0.5, valid=valid, groups=g), query, ref_k, ref_v, None)

    class Plain:
        keys, values = K, V
    pre = PreallocLayer.from_layer(Plain, valid, extra=2)
    k2, v2 = pre.update(newk, newv)
    out, _ = decode_attention(_Module(D ** -0.5, layer=pre), query, k2, v2, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert pre.valid_entries().tolist() == [[int(c) + 1 for c in valid.sum(-1)]]


def test_update_writes_in_place_per_batch_and_head():
    """No per-step copy: the buffers keep their storage; each (b, h) writes at its own length."""
    B, kvH, D = 2, 2, 4
    keys = torch.zeros(B, kvH, 6, D)
    lengths = torch.tensor([[6, 3], [1, 4]])
    valid = torch.arange(6)[None, None] < lengths[..., None]
    pre = PreallocLayer(keys, keys.clone(), valid, lengths, extra=5)
    ptr = pre.keys.data_ptr()
    for step in range(3):
        k = torch.full((B, kvH, 1, D), float(step + 1))
        ko, _ = pre.update(k, k)
        assert pre.keys.data_ptr() == ptr and ko.data_ptr() == ptr
    for b in range(B):
        for h in range(kvH):
            n = int(lengths[b, h])
            assert pre.keys[b, h, n:n + 3, 0].tolist() == [1.0, 2.0, 3.0]
            assert pre.valid[b, h].sum() == n + 3
    assert pre.lengths.tolist() == (lengths + 3).tolist() and pre.get_seq_length() == 9


@pytest.fixture(scope="module")
def omni():
    ad = adapter("qwen2_5_omni")
    return ad, ad.encode(family_prompt(ad))


@pytest.mark.parametrize("make,storage", [(Full, "dense"), (lambda: SnapKV(window=8), "dense"),
                                          (lambda: PyramidKV(scorer=SnapKV(window=8)), "layers"),
                                          (lambda: AdaKV(scorer=SnapKV(window=8)), "ragged")])
@pytest.mark.parametrize("mask_only", [False, True])
def test_tokens_equal_the_growing_cache(omni, make, storage, mask_only):
    ad, enc = omni
    out = {}
    for path in ("dynamic", "prealloc"):
        eng = Engine(ad, make(), budget=0.3, max_new_tokens=MAX_NEW, mask_only=mask_only)
        eng.decode_cache = path
        out[path] = eng.generate(enc)
    a, b = out["prealloc"], out["dynamic"]
    assert a.record["decode_cache"] == "prealloc" and b.record["decode_cache"] == "dynamic"
    assert a.token_ids == b.token_ids and len(a.token_ids) > 1
    torch.testing.assert_close(a.first_logits, b.first_logits)
    assert a.record["kv_bytes_kept"] == b.record["kv_bytes_kept"]          # the record still counts what is held
    assert a.record["kv_bytes_allocated"] >= a.record["kv_bytes_kept"]
    if storage == "ragged" and not mask_only:                                # padding to the longest head
        assert a.record["kv_bytes_allocated"] > a.record["kv_bytes_kept"]
    assert a.record["kv_bytes_decode_buffer"] > a.record["kv_bytes_allocated"]
