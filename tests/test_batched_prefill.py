"""The one left-padded batched prefill (avkv.batch_prefill): per sample, a batch whose prompts differ in length (and,
for the media families, in media: video, images, another video) gives what batch 1 gives — the same answer tokens,
the same kept indices per layer and KV head, the same kept entries, the same ledger counts and first logits within
fp32 rounding — on Qwen2 (text), Qwen2.5-VL and Qwen2-VL (image/video; videos of different frame counts),
Qwen2.5-Omni (video with audio, images; clips longer than 5 s), Qwen2-Audio (clips of different lengths, two in a
row; clips cut to its 5 s extractor window), LLaVA-OneVision (images of different sizes; videos), LLaVA-1.5 (two
images, one, none) and InternVL (videos as tiles, images), for the no-op, a dense, a per-head (ragged), a per-layer
and an all-query method (:data:`CASES`); a method the shared forward cannot serve falls back to the per-sample
prefill and says why, and so do media one forward cannot take (image patch stacks of different lengths on an adapter
without ``batch_pad_dims``; LLaVA-OneVision videos of different frame counts), every row still equal to batch 1."""
import contextlib
from pathlib import Path

import pytest
import torch

import avkv.compressor as compressor
from avkv.batch_prefill import BATCHED, pad_token
from avkv.batching import PER_SAMPLE_REASON, generate_batch
from avkv.engine import Engine
from avkv.kvstore import RaggedLayer
from avkv.methods.fastv import FastV
from avkv.methods.snapkv import SnapKV
from avkv.tasks.base import Media, Prompt
from tests.conftest import adapter, fixtures_dir
from tests.test_batching import METHODS as BATCH_METHODS

MAX_NEW = 6
#: the no-op, a dense, a per-head (ragged), a per-layer and an all-query method (test_batching's configurations)
METHODS = {k: BATCH_METHODS[k] for k in ("full", "snapkv", "adakv", "pyramidkv", "h2o")}
QUESTIONS = ("What colour is the moving square?",
             "Which way is the square moving? Answer with the letter of the best option only, please.",
             "How many?")
#: families whose media encoder runs the batch's items as one batch of another size than batch 1's (Qwen2-Audio's
#: audio tower: the rows' 4 clips as [4, 128, 500], batch 1 as 1, 2 and 1): its GEMMs round differently (measured:
#: up to 4e-7 in its output), so their first logits equal batch 1's within fp32 rounding, not bit for bit
MEDIA_ENCODER_REBATCHED = ("qwen2_audio",)
RECORD_KEYS = ("n_prompt", "kept_ratio", "kept_per_layer", "kept_by_modality", "kv_bytes_kept", "kv_storage",
               "budget_achieved", "budget_held")


#: LLaVA-OneVision images of different sizes that its anyres tiling cuts into the same number of patches (64x64
#: base grid: 2 each; their unpadded features differ in length), and one it cuts into 3 (:func:`_sized`; the
#: batch zero-pads the patch stacks: ``batch_pad_dims``)
SAME_PATCHES, MORE_PATCHES = ((64, 48), (48, 64), (100, 60)), (128, 64)


def _sized(tmp: Path, size: tuple[int, int]) -> str:
    """The first ALFRED fixture image resized to ``size`` (w, h), written under ``tmp``."""
    from PIL import Image
    out = tmp / f"{size[0]}x{size[1]}.jpg"
    if not out.exists():
        src = sorted((fixtures_dir() / "milebench" / "ALFRED" / "images" / "0").glob("*.jpg"))[0]
        Image.open(src).convert("RGB").resize(size).save(out)
    return str(out)


#: the equality grid's batches: case -> model family (a case named after its family holds that family's default
#: batch, :func:`_prompts`)
CASES = {"qwen2": "qwen2", "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_omni": "qwen2_5_omni", "qwen2_audio": "qwen2_audio",
         "llava_onevision": "llava_onevision", "qwen2_vl": "qwen2_vl",
         "llava": "llava",                                  # two images, one image, no media (a row without pixels)
         "internvl": "internvl",                            # video (frames as tiles), two images, another video
         "llava_onevision_video": "llava_onevision",        # three videos of the same frame count (8)
         "qwen2_audio_long": "qwen2_audio",                 # clips longer than the 5 s extractor window: cut to it
         "qwen2_5_omni_long": "qwen2_5_omni",               # 7.5 s and 12 s clips (its extractor takes 30 s)
         "qwen2_5_vl_frames": "qwen2_5_vl"}                 # videos of 8, 3 and 5 frames (FRAMES_FPS, clipped)
#: the sampling rate of the frame-count cases (the adapter's ``fps``: a 1 s clip gets 3 frames, a 2 s clip 5, the
#: whole 4 s clip ``num_frames`` = 8)
FRAMES_FPS = 2.0
#: the clip ends of the frame-count cases (None: the whole video)
FRAME_CLIPS = (None, 1.0, 2.0)


def _long_wav(tmp: Path, seconds: float, first: int) -> str:
    """LibriSpeech fixture utterances from the ``first``-th on, concatenated and cut to ``seconds`` (16 kHz wav)."""
    import numpy as np
    import soundfile as sf
    out = tmp / f"long_{first}_{seconds}.wav"
    if not out.exists():
        wavs = sorted((fixtures_dir() / "librispeech").rglob("*.flac"))
        parts, n, j = [], 0, first
        while n < seconds * 16000:
            w, sr = sf.read(str(wavs[j % len(wavs)]), dtype="float32")
            assert sr == 16000
            parts.append(w)
            n, j = n + len(w), j + 1
        sf.write(str(out), np.concatenate(parts)[:int(seconds * 16000)], 16000)
    return str(out)


def _frames_prompts(fx: Path) -> list[Prompt]:
    videos = sorted((fx / "avqa" / "videos").glob("*.mp4"))
    return [Prompt(context=[Media("video", str(v), start=None if end is None else 0.0, end=end)], question=q)
            for v, end, q in zip(videos, FRAME_CLIPS, QUESTIONS)]


def _encode(ad, case: str, prompts: list[Prompt]) -> list:
    """The prompts encoded, the frame-count cases' videos sampled at FRAMES_FPS (the shared adapter's ``fps`` is
    restored after)."""
    old = ad.fps
    ad.fps = FRAMES_FPS if case.endswith("_frames") else old
    try:
        return [ad.encode(p) for p in prompts]
    finally:
        ad.fps = old


def _prompts(family: str, tmp: Path | None = None) -> list[Prompt]:
    fx = fixtures_dir()
    if family in ("qwen2_audio_long", "qwen2_5_omni_long"):
        wavs = sorted((fx / "librispeech").rglob("*.flac"))
        return [Prompt(context=[Media("audio", _long_wav(tmp, 7.5, 0))], question=QUESTIONS[0]),
                Prompt(context=[Media("audio", str(wavs[1]))], question=QUESTIONS[1]),
                Prompt(context=["Listen to the whole recording, then answer: ", Media("audio", _long_wav(tmp, 12.0, 2))],
                       question=QUESTIONS[2])]
    if family.endswith("_frames"):
        return _frames_prompts(fx)
    if family == "llava_onevision_video":
        videos = sorted((fx / "avqa" / "videos").glob("*.mp4"))
        return [Prompt(context=[Media("video", str(videos[0]))], question=QUESTIONS[0]),
                Prompt(context=["A clip: ", Media("video", str(videos[1])), "\n"], question=QUESTIONS[1]),
                Prompt(context=[Media("video", str(videos[2]))], question=QUESTIONS[2])]
    if family == "llava":            # two images, one, none
        imgs = sorted((fx / "milebench" / "ALFRED" / "images" / "0").glob("*.jpg"))[:2]
        return [Prompt(context=["First image: ", Media("image", str(imgs[0])), " second image: ",
                                Media("image", str(imgs[1])), "\n"], question=QUESTIONS[1]),
                Prompt(context=[Media("image", str(imgs[0]))], question=QUESTIONS[0]),
                Prompt(context=["A red square moves from the right edge to the left edge of the frame, slowly."],
                       question=QUESTIONS[2])]
    if family == "qwen2_audio":      # audio of different lengths (the features are padded to the extractor's chunk,
        wavs = sorted((fx / "librispeech").rglob("*.flac"))[:4]      # the mask marks each one's frames), two in a row
        return [Prompt(context=[Media("audio", str(wavs[0]))], question=QUESTIONS[0]),
                Prompt(context=["First: ", Media("audio", str(wavs[1])), " then: ", Media("audio", str(wavs[2]))],
                       question=QUESTIONS[1]),
                Prompt(context=[Media("audio", str(wavs[3]))], question=QUESTIONS[2])]
    if family == "llava_onevision":  # images of different sizes and patch counts
        a, b, c, d = (_sized(tmp, sz) for sz in SAME_PATCHES + (MORE_PATCHES,))
        return [Prompt(context=[Media("image", a)], question=QUESTIONS[0]),
                Prompt(context=["First image: ", Media("image", b), " second image: ", Media("image", c), "\n"],
                       question=QUESTIONS[1]),
                Prompt(context=[Media("image", d)], question=QUESTIONS[2])]
    if family == "qwen2":
        ctx = [["A red square moves left."], ["A short clip: a red square moves from the right edge to the left."],
               ["Square."]]
        return [Prompt(context=c, question=q) for c, q in zip(ctx, QUESTIONS)]
    videos = sorted((fx / "avqa" / "videos").glob("*.mp4"))
    imgs = sorted((fx / "milebench" / "ALFRED" / "images" / "0").glob("*.jpg"))[:2]
    return [Prompt(context=[Media("video", str(videos[0]), with_audio=True)], question=QUESTIONS[0]),
            Prompt(context=["First image: ", Media("image", str(imgs[0])), " second image: ",
                            Media("image", str(imgs[1])), "\n"], question=QUESTIONS[1]),
            Prompt(context=[Media("video", str(videos[1]), with_audio=True)], question=QUESTIONS[2])]


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    """(model family, adapter, the case's encoded prompts)."""
    case = request.param
    ad = adapter(CASES[case])
    encs = _encode(ad, case, _prompts(case, tmp_path_factory.mktemp("media")))
    splits = [e.assistant_start for e in encs]
    assert len(set(splits)) == len(splits), "the compressed parts must differ in length (padding exercised)"
    if case.endswith("_frames"):                          # the rows' videos do differ in frame count
        assert len({e.preprocessing["items"][0]["frames"] for e in encs}) == len(encs), case
    if case.endswith("_long"):                            # and the clips in length, beyond the 5 s chunk
        assert max(e.preprocessing["items"][0]["audio_s"] for e in encs) > 5 or \
            any("5s window" in n for e in encs for n in e.notes), case
    return CASES[case], ad, encs


def _same_selections(row_sel: list, ref_sel: list, *where) -> None:
    """A batched row kept what batch 1 kept: the same layers, and per layer the same indices and validity."""
    assert [i for i, *_ in row_sel] == [i for i, *_ in ref_sel], where
    for (i, idx, valid), (_, ridx, rvalid) in zip(row_sel, ref_sel):
        assert torch.equal(idx, ridx), (*where, i)
        assert (valid is None) == (rvalid is None) and (valid is None or torch.equal(valid, rvalid)), (*where, i)


@contextlib.contextmanager
def _selections(monkeypatch):
    """Every applied selection's kept indices, per cache (one cache per sample), in order."""
    seen: dict = {}
    orig = compressor.apply_selection

    def spy(cache, i, module, sel, name, mask_only=False):
        out = orig(cache, i, module, sel, name, mask_only)
        seen.setdefault(id(cache), []).append((i, out[0].clone(), None if out[1] is None else out[1].clone()))
        return out
    monkeypatch.setattr(compressor, "apply_selection", spy)
    yield seen
    monkeypatch.setattr(compressor, "apply_selection", orig)


def _heads(layer):
    if isinstance(layer, RaggedLayer):
        return [layer.head(h) for h in range(layer.num_heads)]
    return [(layer.keys[0, h], layer.values[0, h]) for h in range(layer.keys.shape[1])]


@pytest.mark.parametrize("route", ["rows", "mask"])
@pytest.mark.parametrize("name", list(METHODS))
def test_batched_prefill_equals_batch_one(family, name, route, monkeypatch):
    """``rows``: SDPA row by row on the unpadded slices (avkv.batch_prefill.rows_attention, the SDPA models' route);
    ``mask``: the model's own attention with the padding mask (the route of the other backends)."""
    import avkv.batch_prefill as bp
    if route == "mask":
        monkeypatch.setattr(bp, "ROW_ATTENTION_IMPLS", ())
    fam, ad, es = family
    eng = Engine(ad, METHODS[name](), budget=0.3, max_new_tokens=MAX_NEW)
    seen = {}
    with _selections(monkeypatch) as sel:
        batch = generate_batch(eng, es, on_cache=lambda c: seen.update(cache=c))
    batch_sel = list(sel.values())                       # one entry per row, in row order (every row compresses)
    for b, (g, enc) in enumerate(zip(batch, es)):
        assert g.record["prefill_batched"] is True and g.record["prefill_path"] == BATCHED, g.record["prefill_path"]
        with _selections(monkeypatch) as sel:
            ref = eng.generate(enc)
        assert g.token_ids == ref.token_ids, (fam, name, b)
        assert torch.allclose(g.first_logits, ref.first_logits, rtol=1e-4, atol=1e-5), (fam, name, b)
        if route == "rows" and fam not in MEDIA_ENCODER_REBATCHED:       # (H2O: the same statistics route)
            assert torch.equal(g.first_logits, ref.first_logits), (fam, name, b, "the same SDPA calls as batch 1")
        if route == "rows":                  # (the mask route, other backends: batch 1 there has no statistics)
            assert g.record.get("allquery_route") == ref.record.get("allquery_route"), (fam, name, b)
        for key in RECORD_KEYS:
            assert g.record.get(key) == ref.record.get(key), (fam, name, b, key)
        ref_sel = list(sel.values())
        if name == "full":
            assert not ref_sel and not batch_sel
        else:                                            # the same kept indices, layer by layer, head by head
            assert len(ref_sel) == 1
            _same_selections(batch_sel[b], ref_sel[0], fam, name, b)
        # the batch cache's row b holds sample b's batch-1 prompt cache (real entries only, no NaN), then padding
        with torch.no_grad(), contextlib.ExitStack() as st:
            p = eng.prefill(enc, st)
        for i, layer in enumerate(seen["cache"].layers):
            for h, (k, v) in enumerate(_heads(p.cache.layers[i])):
                S = k.shape[0]
                assert bool(layer.valid[b, h, :S].all())
                assert bool(torch.isfinite(layer.keys[b, h, :S]).all() and torch.isfinite(layer.values[b, h, :S]).all())
                assert torch.allclose(layer.keys[b, h, :S], k, rtol=1e-4, atol=1e-5), (fam, name, b, i, h)
                assert torch.allclose(layer.values[b, h, :S], v, rtol=1e-4, atol=1e-5), (fam, name, b, i, h)


def test_record_and_timing_of_the_batched_prefill(family):
    """``batch_prefill_s`` is the batched forward plus every row's suffix: no shorter than any row's own
    ``prefill_s`` (the forward plus its own suffix); the per-sample path says it was asked for."""
    fam, ad, es = family
    eng = Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=2)
    batch = generate_batch(eng, es)
    for g in batch:
        assert g.record["prefill_batched"] is True and g.record["prefill_path"] == BATCHED
        assert 0 < g.record["prefill_s"] <= g.record["batch_prefill_s"]
    assert len({g.record["batch_prefill_s"] for g in batch}) == 1
    per = generate_batch(eng, es, batched_prefill=False)
    for g in per:
        assert g.record["prefill_batched"] is False and g.record["prefill_path"] == PER_SAMPLE_REASON
        assert g.record["batch_prefill_s"] == pytest.approx(sum(x.record["prefill_s"] for x in per))


def test_a_method_the_shared_forward_cannot_serve_falls_back_with_its_reason():
    """FastV prunes the hidden states of the chunk from layer K on: one forward shared by rows of different
    lengths cannot, so the batch prefills per sample, says why, and still equals batch 1."""
    ad = adapter("qwen2_5_vl")
    es = [ad.encode(p) for p in _prompts("qwen2_5_vl")]
    eng = Engine(ad, FastV(layer=1), budget=0.5, max_new_tokens=3)
    batch = generate_batch(eng, es)
    for g, e in zip(batch, es):
        assert g.record["prefill_batched"] is False
        assert "prunes_hidden_states" in g.record["prefill_path"] and "fastv" in g.record["prefill_path"]
        assert g.token_ids == eng.generate(e).token_ids


def test_pad_token_is_never_a_media_placeholder():
    """The tokenizer's pad id, unless it is a media placeholder (it would be filled with media features): then an
    end-of-sequence id; no such id: the batch falls back (NotBatched)."""
    from types import SimpleNamespace

    from avkv.batch_prefill import NotBatched
    ad = adapter("qwen2_5_vl")
    media = {v for v in ad.placeholder_ids().values() if v is not None}
    assert pad_token(ad) == ad.tokenizer.pad_token_id and pad_token(ad) not in media

    def fake(pad, eos):
        return SimpleNamespace(family="fake", tokenizer=SimpleNamespace(pad_token_id=pad, eos_token_id=eos),
                               eos_token_ids=[eos], placeholder_ids=lambda: {"video": 7, "image": 6})
    assert pad_token(fake(7, 2)) == 2
    with pytest.raises(NotBatched, match="no pad or end-of-sequence id"):
        pad_token(fake(7, 6))


def test_a_kernel_that_makes_nan_of_pad_queries_leaks_nothing(monkeypatch):
    """On the model's own attention with the padding mask (the route of backends other than SDPA, forced here), a
    pad query of a left-padded row attends to nothing; torch 2.13's CPU SDPA returns 0 there, other kernels NaN,
    which would reach the row's real queries through the pad tokens' values (0 · NaN). Make SDPA return NaN for
    every fully masked query row: the batch still equals batch 1, every kept entry finite. (compress_at=prompt: the
    first token comes from the batched forward's last layer, which a leak on this 2-layer model reaches.)"""
    import avkv.batch_prefill as bp
    monkeypatch.setattr(bp, "ROW_ATTENTION_IMPLS", ())
    real = torch.nn.functional.scaled_dot_product_attention
    hits = []

    def nan_rows(q, k, v, attn_mask=None, **kw):
        out = real(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool and attn_mask.dim() == 4:
            dead = ~attn_mask.any(-1, keepdim=True)
            if bool(dead.any()):
                hits.append(int(dead.sum()))
                out = out.masked_fill(dead, float("nan"))
        return out
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_rows)
    ad = adapter("qwen2")
    es = [ad.encode(p) for p in _prompts("qwen2")]
    eng = Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=MAX_NEW, compress_at="prompt")
    seen = {}
    batch = generate_batch(eng, es, on_cache=lambda c: seen.update(cache=c))
    assert hits, "no fully masked query row: the padding was not exercised"
    for b, (g, e) in enumerate(zip(batch, es)):
        assert g.record["prefill_path"] == BATCHED and g.token_ids == eng.generate(e).token_ids
        for layer in seen["cache"].layers:
            assert bool(torch.isfinite(layer.keys[layer.valid]).all() and torch.isfinite(layer.values[layer.valid]).all())


def test_media_one_forward_cannot_take_fall_back_per_sample_with_the_shape_reason(tmp_path, monkeypatch):
    """LLaVA-OneVision images its anyres tiling cuts into different numbers of patches (2 and 3) give pixel values
    of different shapes; without the adapter's ``batch_pad_dims`` (which lets the batch zero-pad the patch stacks)
    they cannot be concatenated: the batch prefills per sample, ``prefill_path`` names the input and its shapes, and
    every row still equals batch 1."""
    ad = adapter("llava_onevision")
    monkeypatch.setattr(ad, "batch_pad_dims", {})
    es = [ad.encode(Prompt(context=[Media("image", _sized(tmp_path, sz))], question=q))
          for sz, q in zip((SAME_PATCHES[0], MORE_PATCHES), QUESTIONS)]
    eng = Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=3)
    batch = generate_batch(eng, es)
    for g, e in zip(batch, es):
        assert g.record["prefill_batched"] is False
        assert "'pixel_values' have shapes [(1, 2, 3, 112, 112), (1, 3, 3, 112, 112)]" in g.record["prefill_path"]
        assert g.token_ids == eng.generate(e).token_ids


@pytest.mark.parametrize("name", ["snapkv", "adakv"])
def test_videos_of_different_frame_counts_fall_back_on_llava_onevision_and_equal_batch_one(name, monkeypatch):
    """LLaVA-OneVision takes a batch's videos as one ``[videos, frames, 3, H, W]`` stack and has no per-video frame
    count to cut a zero-padded stack at: videos of 8, 3 and 5 frames (FRAMES_FPS, clipped) cannot share the forward.
    The batch prefills per sample, ``prefill_path`` names the input and its shapes, and every row equals batch 1
    bit for bit (the same tokens, first logits, record fields and kept indices per layer and head). (Qwen2.5-VL
    flattens the frames' patches: the same videos share its batched prefill, case ``qwen2_5_vl_frames``.)"""
    ad = adapter("llava_onevision")
    es = _encode(ad, "llava_onevision_frames", _frames_prompts(fixtures_dir()))
    assert [e.preprocessing["items"][0]["frames"] for e in es] == [8, 3, 5]
    eng = Engine(ad, METHODS[name](), budget=0.3, max_new_tokens=MAX_NEW)
    with _selections(monkeypatch) as sel:
        batch = generate_batch(eng, es)
    batch_sel = list(sel.values())
    assert len(batch_sel) == len(es)
    for b, (g, e) in enumerate(zip(batch, es)):
        assert g.record["prefill_batched"] is False
        assert ("'pixel_values_videos' have shapes [(1, 8, 3, 112, 112), (1, 3, 3, 112, 112), (1, 5, 3, 112, 112)]"
                in g.record["prefill_path"]), g.record["prefill_path"]
        with _selections(monkeypatch) as sel:
            ref = eng.generate(e)
        assert g.token_ids == ref.token_ids and torch.equal(g.first_logits, ref.first_logits), (name, b)
        for key in RECORD_KEYS:
            assert g.record.get(key) == ref.record.get(key), (name, b, key)
        (ref_sel,) = sel.values()
        _same_selections(batch_sel[b], ref_sel, name, b)


#: the methods that need statistics over every prompt query (``all_query_stats``), from their configs
ALLQUERY = ("h2o", "lookm", "d2o", "kvmerge", "acckv", "flowmm", "observed_attention")


def _allquery_method(name: str):
    from avkv.config import compose, instantiate
    over = ["method.decode_policy=grow"] if name in ("h2o", "d2o") else []     # fixed: refused at batch size > 1
    m = instantiate(compose([f"method={name}", *over]).method)
    assert m.all_query_stats, name
    return m


@contextlib.contextmanager
def _recomputed(monkeypatch):
    """Every all-query pass that recomputes the softmax from the queries (``column_pass`` without captured
    log-sum-exps: the route taken when the prefill gave no statistics), counted."""
    import avkv.methods.allquery as aq
    calls = []
    orig = aq.column_pass

    def spy(queries, keys, scale, num_heads, lse=None, *a, **kw):
        if lse is None:
            calls.append(int(keys.shape[1]))
        return orig(queries, keys, scale, num_heads, lse, *a, **kw)
    monkeypatch.setattr(aq, "column_pass", spy)
    yield calls
    monkeypatch.setattr(aq, "column_pass", orig)


@contextlib.contextmanager
def _stats(monkeypatch):
    """The prefill statistics every compressed layer's view got (queries, log-sum-exps, fused sums), per sample
    (batch 1: the module's sink; a batched row: its own) in order."""
    import avkv.lse_attention as la
    seen: dict = {}
    orig = la.attach

    def spy(view, module, sink=None):
        out = orig(view, module, sink)
        st = out.stats
        seen.setdefault(id(sink), []).append(
            (view.layer_idx, None if st is None else (st.queries.clone(), st.lse.clone(),
                                                      None if st.sums is None else st.sums.clone())))
        return out
    monkeypatch.setattr(la, "attach", spy)
    yield seen
    monkeypatch.setattr(la, "attach", orig)


@pytest.fixture(scope="module")
def omni_rows(tmp_path_factory):
    """Qwen2.5-Omni rows of video with audio, two images, another video (modality blocks for AccKV / FlowMM)."""
    ad = adapter("qwen2_5_omni")
    return ad, [ad.encode(p) for p in _prompts("qwen2_5_omni")]


@pytest.mark.parametrize("rule", ["measured", "lse"])
@pytest.mark.parametrize("name", ALLQUERY)
def test_allquery_rows_take_the_prefill_statistics_route_and_equal_batch_one(omni_rows, name, rule, monkeypatch):
    """An all-query method's row gets its statistics from the batched prefill's own attention of the row (its
    unpadded queries, keys and values: the statistics route batch 1 takes), never from recomputed queries: the record
    says the same ``allquery_route`` as batch 1 (``rule=measured``: the fused route on these lengths; ``lse``: the
    SDPA kernel's log-sum-exps, forced), no pass recomputes the softmax, and every row's answer tokens, first logits,
    record fields, kept indices per layer and head and kept entries are batch 1's, bit for bit."""
    import avkv.methods.allquery as aq
    if rule == "lse":
        monkeypatch.setattr(aq, "prefill_route", lambda *a, **k: "lse")
    ad, es = omni_rows
    eng = Engine(ad, _allquery_method(name), budget=0.3, max_new_tokens=MAX_NEW)
    seen = {}
    with _selections(monkeypatch) as sel, _recomputed(monkeypatch) as recomputed, _stats(monkeypatch) as stats:
        batch = generate_batch(eng, es, on_cache=lambda c: seen.update(cache=c))
    assert not recomputed, (name, "the batched rows recomputed the softmax for", recomputed)
    batch_sel, batch_stats = list(sel.values()), list(stats.values())
    assert len(batch_sel) == len(es) and len(batch_stats) == len(es)
    for b, (g, enc) in enumerate(zip(batch, es)):
        assert g.record["prefill_path"] == BATCHED, g.record["prefill_path"]
        with _selections(monkeypatch) as sel, _stats(monkeypatch) as stats:
            ref = eng.generate(enc)
        (ref_stats,) = stats.values()         # the row's statistics are batch 1's: no pad in a sum or a normaliser
        assert [i for i, _ in batch_stats[b]] == [i for i, _ in ref_stats] and len(ref_stats) > 0
        for (i, got), (_, want) in zip(batch_stats[b], ref_stats):
            assert got is not None and want is not None, (name, b, i, "no statistics")
            for x, y in zip(got, want):
                assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), (name, b, i)
        route = ref.record.get("allquery_route")
        assert route == ("lse" if rule == "lse" else "fused/" + aq.fused_impl(ad.device)), (name, route)
        assert g.record.get("allquery_route") == route, (name, b)
        assert g.token_ids == ref.token_ids, (name, b)
        assert torch.equal(g.first_logits, ref.first_logits), (name, b)
        for key in RECORD_KEYS:
            assert g.record.get(key) == ref.record.get(key), (name, b, key)
        (ref_sel,) = sel.values()
        _same_selections(batch_sel[b], ref_sel, name, b)
        with torch.no_grad(), contextlib.ExitStack() as st:      # the kept (merged) entries themselves
            p = eng.prefill(enc, st)
        for i, layer in enumerate(seen["cache"].layers):
            for h, (k, v) in enumerate(_heads(p.cache.layers[i])):
                S = k.shape[0]
                assert bool(layer.valid[b, h, :S].all())
                assert torch.equal(layer.keys[b, h, :S], k) and torch.equal(layer.values[b, h, :S], v), (name, b, i, h)
