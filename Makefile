# Two commands for a newcomer: `make run` and `make test`. Both set up everything they need first.
PY_SYS ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  := .cache
# a folder holding the torch CPU wheel (for `make lock`), when pip finds it there
FIND_LINKS ?= $(PIP_FIND_LINKS)

.PHONY: venv setup assets run test test-slurm clean apt proxies proxy-table qwenutils-venv parity-venv lock

$(STAMP): requirements/cpu.lock.txt pyproject.toml setup.py
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$$(grep '^torch==' requirements/cpu.lock.txt | cut -d= -f3)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/cpu.lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

# Regenerate the complete CPU lock from pyproject.toml (runtime + test + wandb extras) and requirements/cpu.in (the
# torch CPU wheel), with uv from PyPI; the venv then reinstalls from it.
lock: venv
	$(PY) -m pip install -q --disable-pip-version-check uv
	@{ sed -n 1,3p requirements/cpu.lock.txt; $(VENV)/bin/uv pip compile pyproject.toml requirements/cpu.in --extra test \
	   --extra wandb --python-version 3.11 $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) --no-emit-find-links --quiet -o -; } > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock.txt

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

# Side venv with NVIDIA's kvpress 0.5.5 (it brings transformers 5.2, which the main venv must never see) for the
# reference-parity suite tests/parity/: torch from the lock first (the local CPU wheel), then kvpress, with numpy and
# the small shared packages constrained to the lock where kvpress allows it. If it cannot be built, .failed says
# why and the parity tests fail with that message (they never skip).
KVPRESS := $(CACHE)/venv-kvpress
KVPRESS_STAMP := $(KVPRESS)/.installed

$(KVPRESS_STAMP): requirements/kvpress.txt requirements/cpu.lock.txt
	@mkdir -p $(KVPRESS) && rm -f $(KVPRESS)/.failed
	@test -x $(KVPRESS)/bin/python || $(PY_SYS) -m venv $(KVPRESS)
	@{ $(KVPRESS)/bin/pip install -q --disable-pip-version-check \
	     torch==$$(grep '^torch==' requirements/cpu.lock.txt | cut -d= -f3) && \
	   grep -E '^(numpy|safetensors|pillow|requests|packaging|pyyaml|filelock|regex)==' requirements/cpu.lock.txt \
	     > $(KVPRESS)/constraints.txt && \
	   $(KVPRESS)/bin/pip install -q --disable-pip-version-check -c $(KVPRESS)/constraints.txt \
	     -r requirements/kvpress.txt && touch $@; } > $(KVPRESS)/build.log 2>&1 || \
	 { echo "pip install of requirements/kvpress.txt into $(KVPRESS) failed; last lines of $(KVPRESS)/build.log:" \
	     > $(KVPRESS)/.failed; tail -n 5 $(KVPRESS)/build.log >> $(KVPRESS)/.failed; \
	   echo "note: side venv $(KVPRESS) not built; the kvpress parity tests will fail"; }

parity-venv: $(KVPRESS_STAMP)

setup: assets qwenutils-venv parity-venv

run: setup
	$(PY) run.py $(ARGS)

# `make test`: the main suite (fake SLURM in tests/sweeps), then the real-SLURM tier; both run, either failing fails.
# The 25 slowest tests are listed at the end, so CI shows where the suite's time goes.
test: setup
	@rc=0; $(PY) -m pytest --ignore=tests/slurm --durations=25 $(PYTEST_ARGS) || rc=1; \
	  $(MAKE) --no-print-directory test-slurm || rc=1; exit $$rc

# The real-SLURM tier alone: a single-node SLURM (+ accounting) on 127.0.0.1 started for the tests and stopped
# after them (scripts/slurm/test_tier.sh); where the machine cannot run one (no root/apt) it says so and passes.
test-slurm: setup
	PY=$(PY) scripts/slurm/test_tier.sh $(SLURM_PYTEST_ARGS)

# Retrain the committed proxy checkpoints on CPU (at most about 3.7 h of time budgets; 2 free cores). First the 2-layer proxies: the AV
# proxy, then the video and audio proxies warm-started from its towers and decoder, then the AV phase that teaches
# it to answer from the media entries only (its leak control). Then each is grown to its depth (--grow split:
# every layer becomes a block of copies sharing its work) and trained on: AV 6 layers, video and audio 4
# (docs/proxies.md). Each checkpoint's TRAINING.json lists the exact commands of the phases that made it;
# regenerate the reference table with `make proxy-table`.
CK := avkv/models/proxy_checkpoints
TRAIN := $(PY) scripts/train_proxy.py --workers 1
proxies: setup
	$(TRAIN) --proxy av --layers 2 --minutes 25 --lr 2e-3 --short-frac 0.5
	for p in video audio; do $(TRAIN) --proxy $$p --layers 2 --minutes 30 --lr 2e-3 --short-frac 0.5 \
	  --type-weights 1,1,4 --init-from $(CK)/proxy_av || exit 1; done
	$(TRAIN) --proxy av --layers 2 --minutes 15 --lr 1e-3 --short-frac 0.5 --media-only 1 --data-seed 3 \
	  --init-from $(CK)/proxy_av
	$(TRAIN) --proxy av --minutes 7 --lr 1e-3 --short-frac 0.5 --media-only 1 --data-seed 4 \
	  --init-from $(CK)/proxy_av --grow split
	$(TRAIN) --proxy audio --minutes 15 --lr 1e-3 --short-frac 0.5 --data-seed 4 --init-from $(CK)/proxy_audio --grow split
	$(TRAIN) --proxy audio --minutes 15 --lr 1e-3 --short-frac 0.5 --media-only 1 --data-seed 5 \
	  --init-from $(CK)/proxy_audio
	$(TRAIN) --proxy video --minutes 25 --lr 1.5e-3 --short-frac 0.5 --type-weights 1,1,4 --data-seed 4 \
	  --init-from $(CK)/proxy_video --grow split
	$(TRAIN) --proxy video --minutes 20 --lr 1e-3 --short-frac 0.2 --type-weights 1,1,6 --data-seed 5 \
	  --init-from $(CK)/proxy_video
	$(TRAIN) --proxy video --minutes 20 --lr 1e-3 --short-frac 0 --type-weights 1,1,6 --data-seed 6 \
	  --init-from $(CK)/proxy_video
	$(TRAIN) --proxy video --minutes 15 --lr 2e-3 --short-frac 0 --type-weights 1,1,8 --converged-steps 24 \
	  --data-seed 7 --init-from $(CK)/proxy_video

proxy-table: setup
	$(PY) scripts/proxy_table.py $(ARGS)

clean:
	rm -rf $(CACHE) outputs multirun runs
