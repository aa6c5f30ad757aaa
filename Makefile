# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Each creates the virtualenv it needs. On GPU machines install your CUDA torch first and set
# TORCH_SPEC= (empty) so the CPU wheel is not forced.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
DEMO_PORT ?= 29511

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

venv: $(VENV)/.installed

# The main job: GPT pretraining with ring attention on $(NPROC) gloo ranks (one ring), DeepSpeed ZeRO-1,
# on a recall task whose answers need facts held by the other rank. Extra flags: make demo DEMO_ARGS="...".
# Each run writes its checkpoint and plot to a new runs/demo-DATE-TIME/ unless DEMO_ARGS gives --save.
# The launcher's own lines are off (--log_level critical: its last line would repeat the whole command after an error); --verbose in DEMO_ARGS shows the job's hidden ones.
DEMO_ARGS ?=
ifndef DEMO_RUN
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
DEMO_OUT = $(if $(findstring --save,$(DEMO_ARGS)),,--save $(DEMO_RUN) --plot $(DEMO_RUN)/loss.png)
# DeepSpeed's accelerator is named (cpu: the demo's gloo ranks), so its launcher does not warn that it guessed.
DEMO_ACCELERATOR ?= cpu
demo: $(VENV)/.installed
	DS_ACCELERATOR=$(DEMO_ACCELERATOR) $(VENV)/bin/deepspeed --log_level critical --num_gpus $(NPROC) --master_port $(DEMO_PORT) launch/pretrain_gpt.py \
		--deepspeed_config deepspeed_configs/cpu_demo.json --ring-attention --ring-backend torch --seq-length 128 \
		--num-layers 2 --hidden-size 64 --num-attention-heads 4 --lr 3e-3 --lr-decay-style constant --adam-beta2 0.95 \
		--train-iters 300 --eval-interval 50 $(DEMO_OUT) $(DEMO_ARGS)

# Ring attention alone (no model): error against float64 and memory per rank.
attention-demo: $(VENV)/.installed
	$(PY) launch/ring_attention_demo.py --nproc $(NPROC)

# Two pytest workers (pytest-xdist), one test file at a time each (--dist loadfile): a file's shared job runs
# (session fixtures) are made once. (--dist loadgroup ignores its groups under pytest 9: seen with xdist 3.8.)
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not big" tests

# The tests too large for 2 cores beside the rest (8 ranks of pipeline 2 × ring 2 × tensor 2).
test-big: $(VENV)/.installed
	$(PY) -m pytest -q -m big tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ring_sp megatron_patch launch tests benchmarks

.PHONY: venv demo attention-demo test test-big lint
