# Two entry points: `make demo` (the main job on the bundled model) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
VITRIM := $(VENV)/bin/vitrim
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,plot,images,onnx,hf]'
	touch $@

# Fashion-MNIST from Debian's package when it is missing and apt-get is available.
data:
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing dataset-fashion-mnist with apt-get"; \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq >/dev/null && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; \
	else echo "apt-get not found: vitrim will look in ~/.cache/vitrim or download Fashion-MNIST"; fi

demo: setup data
	$(VITRIM) eval fmnist-vit --data fashion-mnist
	$(VITRIM) analyze fmnist-vit --threads 2
	$(VITRIM) prune --target flops=0.5 --recover reconstruct --threads 2

test: setup data
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
