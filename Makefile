# Two commands: `make test` (the whole suite, CPU) and `make demo` (the teacher -> student -> FGD pipeline).
# Both build .venv first (scripts/setup_venv.sh; seconds when it is already in place).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo
setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m fgd_d2.pipeline $(if $(DATA),--data $(DATA)) $(if $(OUTPUT),--output $(OUTPUT)) \
		$(if $(FAMILY),--family $(FAMILY)) $(if $(QUICK),--quick)
