# Two commands for a newcomer: `make run` and `make test`. Both set up everything they need first.
PY_SYS ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  := .cache

.PHONY: venv setup assets run test clean apt proxies proxy-table qwenutils-venv

$(STAMP): requirements/cpu.lock.txt pyproject.toml
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$$(grep '^torch==' requirements/cpu.lock.txt | cut -d= -f3)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/cpu.lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

# espeak-ng gives real speech for the ASR fixtures; tests that need it skip with a reason where it cannot be installed.
apt:
	@command -v espeak-ng >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null 2>&1) || \
	  echo "note: espeak-ng not installed; speech fixtures fall back or skip"; }

# Tiny checkpoints and generated fixtures live in .cache/ (outside git); each step is skipped when already there.
assets: venv apt
	$(PY) scripts/make_tiny_models.py --out $(CACHE)/models
	$(PY) scripts/make_fixtures.py --out $(CACHE)/fixtures
	@# AudioKV head scores for the tiny and proxy audio models (synthetic tone-burst utterances, teacher-forced:
	@# these models do not transcribe speech; real checkpoints are calibrated on LibriSpeech, see README)
	@for m in tiny_qwen2_5_omni tiny_qwen2_5_omni_deep tiny_qwen2_audio proxy_av proxy_audio; do \
	  $(PY) scripts/calibrate_audiokv.py --model $$m --synthetic 2 --teacher-forcing --skip-existing || exit 1; done

# Side venv with the official Qwen preprocessing packages (qwen-vl-utils, qwen-omni-utils, librosa, decord) for
# tests/models/test_qwen_input_parity.py: torch from the lock first (the local CPU wheel, so pip pulls no CUDA
# build), the rest constrained to the lock. If it cannot be built, those tests fail and say why.
QWENUTILS := $(CACHE)/venv-qwenutils
QWENUTILS_STAMP := $(QWENUTILS)/.installed

$(QWENUTILS_STAMP): requirements/qwenutils.txt requirements/cpu.lock.txt
	@mkdir -p $(QWENUTILS) && rm -f $(QWENUTILS)/.failed
	@test -x $(QWENUTILS)/bin/python || $(PY_SYS) -m venv $(QWENUTILS)
	@{ $(QWENUTILS)/bin/pip install -q --disable-pip-version-check \
	     torch==$$(grep '^torch==' requirements/cpu.lock.txt | cut -d= -f3) && \
	   grep -E '^(numpy|pillow|av|soundfile|soxr|packaging|requests|scipy)==' requirements/cpu.lock.txt \
	     > $(QWENUTILS)/constraints.txt && \
	   $(QWENUTILS)/bin/pip install -q --disable-pip-version-check -c $(QWENUTILS)/constraints.txt \
	     -r requirements/qwenutils.txt && \
	   ln -sf "$$($(QWENUTILS)/bin/python -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" \
	     $(QWENUTILS)/bin/ffmpeg && touch $@; } || \
	 { echo "pip install of requirements/qwenutils.txt into $(QWENUTILS) failed" > $(QWENUTILS)/.failed; \
	   echo "note: side venv $(QWENUTILS) not built; the Qwen input-parity tests will fail"; }

qwenutils-venv: $(QWENUTILS_STAMP)

setup: assets qwenutils-venv

run: setup
	$(PY) run.py $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Retrain the committed proxy checkpoints on CPU (about 25 min each): the AV proxy first, then the video and audio
# proxies warm-started from its towers and decoder, then a phase that teaches the AV proxy to answer from the
# media entries only (its leak control). Each checkpoint's TRAINING.json lists the exact commands of the phases
# that made it; regenerate the reference table with `make proxy-table`.
proxies: setup
	$(PY) scripts/train_proxy.py --proxy av --minutes 25 --lr 2e-3 --short-frac 0.5 --workers 1
	for p in video audio; do $(PY) scripts/train_proxy.py --proxy $$p --minutes 30 --lr 2e-3 --short-frac 0.5 \
	  --workers 1 --type-weights 1,1,4 --init-from avkv/models/proxy_checkpoints/proxy_av || exit 1; done
	$(PY) scripts/train_proxy.py --proxy av --minutes 15 --lr 1e-3 --short-frac 0.5 --workers 1 --media-only 1 \
	  --data-seed 3 --init-from avkv/models/proxy_checkpoints/proxy_av

proxy-table: setup
	$(PY) scripts/proxy_table.py $(ARGS)

clean:
	rm -rf $(CACHE) outputs multirun runs
