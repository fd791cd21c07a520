# Entry points for people and CI. Everything here needs root: the end-to-end tests and the demo boot
# a real systemd in a throwaway Debian container (debootstrap + systemd-nspawn).
PYTHON ?= python3

.PHONY: test check lint deps demo unit integration e2e

## The whole test suite: lint, unit, integration (systemd-socket-activate) and end-to-end (containers).
test: deps lint
	$(PYTHON) -m pytest

## Without the containers and VMs: fast feedback while hacking.
check: lint
	$(PYTHON) -m pytest -m "not e2e and not vm"

lint:
	$(PYTHON) -m ruff check runner trigger tests demo
	$(PYTHON) -m ruff format --check runner trigger tests demo
	$(PYTHON) -m mypy --strict runner trigger

## Host packages the tests need (idempotent; apt and pip).
deps:
	bash .ci/install-deps

## Boot a throwaway Debian container, install jobrunner, run the example job as a developer.
demo: deps
	$(PYTHON) demo/run_demo.py $(if $(DISTRO),--distro $(DISTRO))
