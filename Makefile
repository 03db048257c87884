# `make demo` and `make test` work on a fresh clone: each creates .venv if it is
# missing, installs what it needs, then runs.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: demo test setup clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# Reinstall when pyproject.toml changes.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Two pytest workers (pytest-xdist), a test file each at a time: most of the
# suite is single-threaded XLA compilation, so on the 2-core CI machine two
# workers take ~10 min (tests/conftest.py compiles at LLVM -O0: it was ~15).
# PYTEST_WORKERS=0 runs in-process.
PYTEST_WORKERS ?= 2
# pytest exits 5 when it collects no tests; make would turn that into 2, so it
# is told apart here (and reported) rather than in .ci/run.
test: $(STAMP)
	@$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Trains configs/demo.py into runs/demo and, from its CPT model, the
# classification head of configs/demo_cls.py into runs/demo_cls (re-running
# resumes or, once finished, only reports), then prints where things are,
# sample generations, and the intent task's scores both ways.
demo: $(STAMP)
	$(VPY) -m jaxsft.train --config configs/demo.py
	$(VPY) -m jaxsft.train --config configs/demo_cls.py
	$(VPY) tools/demo_report.py runs/demo runs/demo_cls

clean:
	rm -rf $(VENV) runs/demo runs/demo_cls
