# Two entry points: `make demo` (the main job on the bundled model) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
VITRIM := $(VENV)/bin/vitrim
# timm imports torchvision, which has no CPU build beside torch 2.13: its tests get their own
# environment with the torch/torchvision pair that installs here.
TIMM_VENV ?= .venv-timm
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-core test-timm setup data clean dense-reference

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,plot,images,onnx,hf,dense]'
	touch $@

$(TIMM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(TIMM_VENV)/bin/python -m pip install --quiet -e '.[dev,timm]'
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

# The reference detector and segmenter of docs/dense.md: a synthetic COCO-format set of
# Fashion-MNIST items on 48x48 canvases, both models started from fmnist-vit (about an hour on 2 cores).
DENSE_DATA ?= data/coco48
dense-reference: runs/detector/model.safetensors runs/segmenter/model.safetensors

$(DENSE_DATA)/annotations/instances_val.json: | setup data
	$(VITRIM) coco-synthetic --out $(DENSE_DATA) --canvas 48 --train 2400 --val 500 --items 1,3 --scales 0.75,1.5 --seed 0 --force

runs/detector/model.safetensors: $(DENSE_DATA)/annotations/instances_val.json
	$(VITRIM) train --task detect --data coco:$(DENSE_DATA) --init fmnist-vit --out runs/detector --epochs 12

runs/segmenter/model.safetensors: $(DENSE_DATA)/annotations/instances_val.json
	$(VITRIM) train --task segment --data coco:$(DENSE_DATA) --init fmnist-vit --out runs/segmenter --epochs 6

test: test-core test-timm

test-core: setup data
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests --ignore=tests/test_adapter_timm.py --durations=15

test-timm: $(TIMM_VENV)/.installed
	HF_HUB_OFFLINE=1 $(TIMM_VENV)/bin/python -m pytest tests/test_adapter_timm.py tests/test_readme.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) .pytest_cache
