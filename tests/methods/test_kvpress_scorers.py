"""Knorm, KeyDiff, TOVA and observed attention against loop references written from their definitions (the
papers and kvpress 0.5.5's press docstrings); the model-level comparison with kvpress itself is tests/parity."""
import math

import torch

from avkv.methods.keydiff import KeyDiff
from avkv.methods.knorm import Knorm
from avkv.methods.observed_attention import ObservedAttention
from avkv.methods.tova import TOVA
from tests.methods.helpers import make_view, naive_attention, naive_topk


def kept(sel):
    return sel.indices.tolist()


def test_knorm_keeps_the_smallest_key_norms():
    v = make_view(seq=40, n_keep=11, seed=1)
    for h in range(2):
        norms = [math.sqrt(sum(float(x) ** 2 for x in v.keys[h, j])) for j in range(40)]
        assert kept(Knorm().compress(v))[h] == sorted(sorted(range(40), key=lambda j: norms[j])[:11])


def test_keydiff_keeps_the_keys_farthest_from_the_mean_direction():
    v = make_view(seq=40, n_keep=9, seed=2)
    for h in range(2):
        ks = [[float(x) for x in v.keys[h, j]] for j in range(40)]
        unit = [[x / math.sqrt(sum(y * y for y in k)) for x in k] for k in ks]
        anchor = [sum(u[d] for u in unit) / 40 for d in range(len(unit[0]))]
        an = math.sqrt(sum(a * a for a in anchor))
        cos = [sum(u[d] * anchor[d] for d in range(len(anchor))) / an for u in unit]
        assert kept(KeyDiff().compress(v))[h] == sorted(sorted(range(40), key=lambda j: cos[j])[:9])


def test_tova_uses_the_last_query_averaged_over_all_heads():
    v = make_view(seq=30, n_keep=8, seed=3)
    A = naive_attention(v)                                              # [H, S, S]
    s = [sum(float(A[h, -1, j]) for h in range(v.num_heads)) / v.num_heads for j in range(30)]
    want = naive_topk(s, 8, protect_last=1)
    assert kept(TOVA().compress(v)) == [want, want]                     # every KV head keeps the same positions


def test_tova_fixed_decode_drops_the_least_attended_entry():
    v = make_view(seq=21, n_keep=20, seed=4)
    sel = TOVA(decode_policy="fixed").decode_step(v)
    A = naive_attention(v)
    s = [sum(float(A[h, -1, j]) for h in range(v.num_heads)) for j in range(21)]
    drop = min(range(20), key=lambda j: s[j])
    assert kept(sel) == [[j for j in range(21) if j != drop]] * 2
    assert TOVA(decode_policy="fixed").decode_step(make_view(seq=20, n_keep=20)) is None


def test_observed_attention_is_the_mean_attention_received():
    v = make_view(seq=36, n_keep=10, seed=5)
    A = naive_attention(v)
    S, g = 36, v.groups
    for h in range(2):
        s = [sum(float(A[q, i, j]) for q in range(h * g, h * g + g) for i in range(j, S)) / (g * (S - j))
             for j in range(S)]
        assert kept(ObservedAttention().compress(v))[h] == naive_topk(s, 10)
