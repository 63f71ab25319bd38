# The two entry points of the README. Both install first, so they work on a fresh clone.
PYTHON ?= python
DEMO_PROMPTS ?= ["a red circle on a black background","a blue circle on a black background"]

.PHONY: install install-test demo test test-fast

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'

# Main job: a word swap on the built-in model -> captioned grid (source, edit, same-seed baseline, attention).
demo: install
	$(PYTHON) scripts/edit.py model=tiny edit=replace 'prompts=$(DEMO_PROMPTS)' seed=3 baseline=true attention=true

test: install-test
	$(PYTHON) -m pytest -q

test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow"
