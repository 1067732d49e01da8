# The two quick-start commands: `make demo` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .make-installed

.PHONY: demo test install docs-cli reproduce clean

$(STAMP): pyproject.toml
	$(PIP) install --quiet --disable-pip-version-check -e ".[dev,clip]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(PYTHON) -m pytest -q

reproduce: $(STAMP)
	$(PYTHON) scripts/reproduce_fashion_mnist.py --overwrite

docs-cli: $(STAMP)
	$(PYTHON) scripts/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf runs $(STAMP)
