"""The proxy task generator (avkv/tasks/fixtures/proxy.py) and the training stream (scripts/train_proxy.py).

Every answer must follow from the evidence written into the clip, and the training stream must render an item
exactly as ``run.py`` renders the held-out file of the same item (same prompt, same token layout), otherwise the
committed checkpoints would be trained on one thing and scored on another.
"""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from avkv.config import ROOT
from avkv.tasks.fixtures import proxy as tasks
from tests.conftest import fixtures_dir

PROXIES_NAMES = ("video", "audio", "av")

CASES = [(p, t) for p, spec in tasks.SPECS.items() for t in spec.types]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_proxy", ROOT / "scripts" / "train_proxy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("proxy,qtype", CASES, ids=[f"{p}-{'/'.join(t)}" for p, t in CASES])
def test_the_answer_follows_from_the_evidence(proxy, qtype):
    rng = np.random.default_rng(0)
    spec = tasks.SPECS[proxy]
    answers = Counter()
    for _ in range(40):
        it = tasks.make_item(rng, proxy, qtype)
        f, rel, typ = it["facts"], it["question_relation"], it["question_type"]
        answer = it["choices"][it["answer"]]
        answers[it["answer"]] += 1
        colours = [x["colour"] for x in f["flashes"]]
        pitches = [x["pitch"] for x in f["tones"]]
        if proxy == "av":
            assert len(colours) == 1 and len(pitches) == 1          # both needles are always there
            expect = {"Visual": colours[0], "Audio": pitches[0], "Both": f"{colours[0]} and {pitches[0]}"}[rel]
            assert answer == expect
        elif typ == "Which":
            assert answer == (colours or pitches)[0] and len(colours) + len(pitches) == 1
        elif typ == "Pair":
            values = colours or pitches
            assert len(values) == 2 and len(set(values)) == 2 and set(answer.split(" and ")) == set(values)
            assert sum(all(v in c for v in values) for c in it["choices"]) == 1   # one option names both
        elif typ == "Majority":                       # the answer leads every other colour by one flash
            n = Counter(colours).most_common()
            assert n[0][0] == answer and n[0][1] == n[1][1] + 1 and len(colours) >= 3
        else:
            assert tasks.COUNTS.index(answer) + 1 == len(pitches)
        if it["frames"] is not None:
            assert it["frames"].shape == (spec.frames, spec.height, spec.width, 3)
            for x in f["flashes"]:                      # the flash is on its temporal patch (two frames)
                y0, x0, s = x["box"]
                patch = it["frames"][2 * x["group"]:2 * x["group"] + 2, y0:y0 + s, x0:x0 + s].astype(int)
                assert np.abs(patch.mean((0, 1, 2)) - np.array(tasks.COLOURS[x["colour"]])).max() < 20
        if it["audio"] is not None:
            assert len(it["audio"]) == int(spec.audio_s * tasks.SR)
            for x in f["tones"]:
                a = int(x["t0"] * tasks.SR)
                seg = it["audio"][a:a + int(x["dur"] * tasks.SR)]
                freqs = np.fft.rfftfreq(len(seg), 1 / tasks.SR)
                assert abs(freqs[np.abs(np.fft.rfft(seg)).argmax()] - x["freq_hz"]) < 0.05 * x["freq_hz"]
    assert len(answers) >= 3, answers              # answers are spread over the options


@pytest.mark.parametrize("proxy", ["av"])
def test_training_renders_an_item_as_the_evaluation_does(proxy):
    """The first held-out clip, decoded from its mp4 and fed through the training stream's ``encode_item``, gives
    the same token ids and position ids as ``run.py``'s path (task prompt → adapter.encode) on that file."""
    import torch

    from avkv.config import compose, instantiate
    from avkv.models import media_io
    from avkv.proxies.build import PROXIES
    p = PROXIES[proxy]
    root = fixtures_dir() / f"proxy_{proxy}"
    cfg = compose([f"model=proxy_{proxy}", f"dataset=proxy_{proxy}", f"paths.fixtures={fixtures_dir()}"])
    adapter = instantiate(cfg.model, device="cpu")
    task = instantiate(cfg.dataset)
    doc = next(iter(task.docs()))
    from avkv.experiment import build_prompt
    enc = adapter.encode(build_prompt(task, adapter, doc))

    item = json.loads((root / "val_qa.json").read_text())[0]
    video = root / "videos" / f"{item['video_name']}.mp4"
    frames, _ = media_io.load_video_frames(str(video), num_frames=None)
    audio = media_io.load_audio(str(video)) if p.spec.audio_s else None
    gen = {"frames": frames if p.spec.frames else None, "audio": audio, "question": item["question_text"],
           "choices": item["multi_choice"], "answer": item["answer"]}
    inputs, ids, pos, _ = _train_script().encode_item(adapter, task, p.family, p.spec, gen)
    assert torch.equal(ids, enc.input_ids)
    assert torch.equal(pos[..., :ids.shape[1]], adapter.prompt_position_ids(enc))


def test_a_proxy_held_out_set_is_rebuilt_when_its_generator_changes(monkeypatch):
    """Fixture versions hash the module that defines the builder; the proxy builders are ``functools.partial``s,
    whose ``__module__`` is ``functools``: the hash must still follow ``avkv/tasks/fixtures/proxy.py``."""
    from pathlib import Path

    from avkv.tasks import fixtures
    before = fixtures._version("proxy_av")
    generator, read_bytes = Path(tasks.__file__), Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: read_bytes(self) + (b"\n# edited" if self == generator else b""))
    assert fixtures._version("proxy_av") != before


@pytest.mark.parametrize("proxy", list(tasks.SPECS))
def test_held_out_answers_are_balanced_per_type(proxy):
    """Every block of 4 items of a type holds each letter once: on a type-balanced prefix a media-blind model
    that always gives one letter scores exactly chance (the leak control's reference)."""
    items = json.loads((fixtures_dir() / f"proxy_{proxy}" / "val_qa.json").read_text())
    n_types = len(tasks.SPECS[proxy].types)
    for t in range(n_types):
        answers = [x["answer"] for x in items[t::n_types]]
        assert all(sorted(answers[i:i + 4]) == [0, 1, 2, 3] for i in range(0, len(answers) - 3, 4)), answers


def test_training_split_reads_match_one_forward_and_the_engine_leak_control():
    """``split_forward`` (the ``--media-only`` training loss): its plain read equals one forward over the whole
    sequence, its dropped-media read gives the logits the engine gives with ``method=drop_media`` at
    ``compress_at=context``, and its swapped read equals the plain read when the two items share their media."""
    import torch

    from avkv.engine import Engine
    from avkv.methods.drop_media import DropMedia
    from avkv.experiment import build_prompt
    from avkv.proxies.build import PROXIES, proxy_task
    from avkv.tasks.base import Doc, Media
    train = _train_script()
    p = PROXIES["av"]
    adapter = train.make_adapter("av", p.checkpoint)
    task = proxy_task("av", p.checkpoint)
    rng = np.random.default_rng(3)
    spec = tasks.SHORT["av"]
    a, b = (tasks.make_item(rng, "av", ("Visual", "Which"), spec) for _ in range(2))
    inputs, ids, pos, layout = train.collate([train.encode_item(adapter, task, p.family, spec, it) for it in (a, b, a)])
    letters = torch.tensor([adapter.tokenizer.convert_tokens_to_ids(x) for x in "ABCD"])
    answer = letters[[a["answer"], b["answer"], a["answer"]]]
    ids = torch.cat([ids, torch.stack([answer, torch.full_like(answer, adapter.eos_token_ids[0])], 1)], 1)
    with torch.no_grad():
        whole = adapter.model(input_ids=ids, position_ids=pos, use_cache=False, **inputs).logits[:, -3:]
        same, swapped, dropped = train.split_forward(adapter.model, adapter.text_config(), inputs, ids, pos, layout,
                                                     layout["context"], torch.tensor([2, 2, 0]))
    assert torch.allclose(same, whole, atol=1e-4)
    assert torch.allclose(swapped[[0, 2]], same[[0, 2]], atol=1e-5)       # items 0 and 2 are the same clip
    assert not torch.allclose(swapped[1], same[1], atol=1e-3)             # item 1 now reads item 0's media

    doc = Doc(id="x", media=[Media("video", "<generated>", with_audio=True)], question=a["question"],
              target=a["answer"], choices=a["choices"])
    enc = adapter.encode_decoded(build_prompt(task, adapter, doc),
                                 [{"frames": a["frames"], "fps": float(spec.fps), "audio": a["audio"]}])
    gen = Engine(adapter, DropMedia(), budget=0.5, compress_at="context", max_new_tokens=1).generate(enc)
    assert torch.allclose(gen.first_logits, dropped[0, 0], atol=1e-4)



def test_proxy_prompts_end_with_the_instruction_the_proxies_read():
    """The proxies' tokenizer corpus holds MC_INSTRUCTION; their dataset configs' prompt must still end with it."""
    from avkv.proxies.build import MC_INSTRUCTION, proxy_task
    for name in PROXIES_NAMES:
        table = proxy_task(name, ".").prompts.as_dict()
        assert table["default"].endswith("\n" + MC_INSTRUCTION), name
