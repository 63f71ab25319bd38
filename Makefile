# The two entry points of the README. Both install first, so they work on a fresh clone.
PYTHON ?= python
DEMO_PROMPTS ?= ["a red circle on a black background","a blue circle on a black background"]

.PHONY: install install-test demo app test test-fast eval

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'

# Main job: a word swap on the built-in model -> captioned grid (source, edit, same-seed baseline, attention).
demo: install
	$(PYTHON) scripts/edit.py model=tiny edit=replace 'prompts=$(DEMO_PROMPTS)' seed=13 baseline=true attention=true

# The interactive editor in the browser on http://127.0.0.1:7860 (docs/app.md); Ctrl-C stops it.
app:
	$(PYTHON) -m pip install -q -e '.[app]'
	$(PYTHON) scripts/app.py

test: install-test
	$(PYTHON) -m pytest -q

test-fast: install-test
	$(PYTHON) -m pytest -q -m "not slow"

# Every number of the model card (models/weights/README.md): generation quality, editing, real images.
# ~35 min on one core of a 2-core CPU; each script prints its table and where its JSON went.
eval: install
	$(PYTHON) scripts/eval_tiny.py
	$(PYTHON) scripts/eval_edits.py
	$(PYTHON) scripts/eval_inversion.py
