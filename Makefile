# fedshield: two commands set everything up on a fresh machine.
#   make run   - create .venv, install, run the quick-start federation, write its report
#   make test  - create .venv, install, lint, type-check, check import layers, run tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Where no CPU wheel of torch is kept locally, set TORCH_INDEX to PyTorch's CPU
# index (https://download.pytorch.org/whl/cpu) to avoid the CUDA build.
TORCH_INDEX ?=

.PHONY: run test lint typecheck layers pytest bench bench-peers bench-peers-quick data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel first, pinned, so that no CUDA build is ever pulled.
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev,ray,parquet]'
	-@$(MAKE) --no-print-directory data
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (offline, 31 MB).
# Best effort: where apt is not available the loader explains how to get it.
data:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist with apt-get"; \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
		|| echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; \
	fi

run: $(STAMP)
	$(BIN)/fedshield simulate examples/quickstart.toml --overwrite

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck layers pytest

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m bench bench -p no:cacheprovider -s

# Side by side with Flower: builds .bench-peers/flower-venv on first use
# (torch 2.13.0 CPU first, then scikit-learn and flwr[simulation]==1.42.0).
bench-peers: $(STAMP)
	TORCH_INDEX=$(TORCH_INDEX) $(BIN)/python bench/peers/run_peers.py

bench-peers-quick: $(STAMP)
	TORCH_INDEX=$(TORCH_INDEX) $(BIN)/python bench/peers/run_peers.py --quick

# A DP-SGD step against a plain step, fedshield beside Opacus: builds
# .bench-dp/opacus-venv on first use (torch 2.13.0 CPU first, then
# opacus==1.6.0) and writes bench/dp/RESULTS.md.
.PHONY: bench-dp
bench-dp: $(STAMP)
	TORCH_INDEX=$(TORCH_INDEX) $(BIN)/python bench/dp/run_opacus.py

# Secure aggregation: what SecAgg / SecAgg+ cost a client and the server
# (bench/secagg/cost.py), then Flower's SecAgg+ beside fedshield's per round
# (bench/secagg/flower_secaggplus.py, in .bench-peers/flower-venv, which is
# built on first use as for bench-peers). Both write bench/secagg/RESULTS.md.
.PHONY: bench-secagg
bench-secagg: $(STAMP)
	$(BIN)/python bench/secagg/cost.py
	TORCH_INDEX=$(TORCH_INDEX) $(BIN)/python -c "import sys; sys.path.insert(0, 'bench/peers'); import run_peers; run_peers.ensure_flower_venv()"
	.bench-peers/flower-venv/bin/python bench/secagg/flower_secaggplus.py

# A real model: the Fashion-MNIST example's CNN round (auto, sequential and
# vectorised backends) against the compute floor, one plain PyTorch loop over
# the same clients and mini-batches in the same process, then Flower 1.42 on
# the same task in .bench-peers/flower-venv (built on first use, as for
# bench-peers). About 10 minutes; writes bench/cnn/RESULTS.md and
# bench/cnn/results.json (`bench/cnn/floor.py --quick`: 2 minutes, no Flower).
.PHONY: bench-cnn
bench-cnn: $(STAMP)
	TORCH_INDEX=$(TORCH_INDEX) $(BIN)/python -c "import sys; sys.path.insert(0, 'bench/peers'); import run_peers; run_peers.ensure_flower_venv()"
	$(BIN)/python bench/cnn/floor.py

# One server and three hospital sites on 127.0.0.1 (gRPC, mutual TLS, SecAgg+,
# central DP) on UCI Heart Disease: examples/network/demo.sh, into
# runs/demo-network/ (about a minute).
.PHONY: demo-network
demo-network: $(STAMP)
	bash examples/network/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Regenerate the Fleet service's Python modules from its protobuf schema
# (src/fedshield/transport/proto/fleet.proto); tests/transport/test_proto.py
# checks that the committed modules match the schema.
.PHONY: proto
proto: $(STAMP)
	cd src && ../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
		--grpc_python_out=. --pyi_out=. fedshield/transport/proto/fleet.proto
