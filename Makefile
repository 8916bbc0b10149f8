# Two entry points: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo study-demo lint test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the constraint keeps every later resolver step on this build.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Offline: fit LoRA on the shipped pretrained t5-tiny with the bundled tokenizer and TweetSumm, then test.
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

# ruff's lint and format checks (configured in pyproject.toml), then the default suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# CPU benchmarks against peft and bitsandbytes (about 20 minutes on 2 cores; run nothing else
# meanwhile), then the tables in benchmarks/README.md from the JSON in benchmarks/results/.
bench: $(STAMP)
	$(PY) -m benchmarks.bench_parity --shape t5-small --batch 2 64 16
	$(PY) -m benchmarks.bench_train_step --shapes t5-small --batch 4 --src 256 --tgt 64 --repeats 10 --warmup 0
	$(PY) -m benchmarks.bench_nf4 --repeats 50
	$(PY) -m benchmarks.bench_memory --shape t5-small --methods "lora r=16 q,v" ia3 "qlora r=16 q,v"
	$(PY) -m benchmarks.bench_inference --shape t5-small --repeats 3
	$(PY) -m benchmarks.bench_end_to_end --shape t5-small --examples 64 --rounds 2
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
