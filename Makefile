# Two entry points: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo study-demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the constraint keeps every later resolver step on this build.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Offline: fit LoRA on a random-init t5-tiny with the bundled tokenizer and TweetSumm, then test.
demo: $(STAMP)
	$(PY) -m experiments fit --config experiments/configs/demo.yaml
	$(PY) -m experiments test --config experiments/configs/demo.yaml --ckpt_path last
	$(PY) -m experiments evaluate --train_config experiments/configs/demo.yaml --run_name base \
	    --base_model true --bertscore_model offline:all-MiniLM-L6-v2
	$(PY) -m experiments evaluate --train_config experiments/configs/demo.yaml --run_name demo-lora \
	    --ckpt_path last --bertscore_model offline:all-MiniLM-L6-v2
	$(PY) -m experiments report --records '[runs/eval/base, runs/eval/demo-lora]' --base_run base --out_dir runs/report

# Offline: the study (base, full, LoRA, QLoRA, IA3, prompt tuning, DoRA) on the pretrained t5-tiny.
study-demo: $(STAMP)
	$(PY) -m experiments study --config experiments/study_demo.yaml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
