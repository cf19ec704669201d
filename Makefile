# d2m: setup, demo, test. Everything runs inside .venv (created by `make setup`).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export D2M_CONFIG   ?= $(CURDIR)/configs/demo.yml

.PHONY: setup demo ui test test-services bench clean

setup:
	python3.11 -m venv .venv
	$(PIP) install -r requirements/requirements.txt -c requirements/constraints.txt
	# insightface pulls in the CPU onnxruntime; the GPU build must overwrite its module, last.
	$(PIP) install --force-reinstall --no-deps onnxruntime-gpu==1.31.1
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PIP) check

demo:
	D2M_RANDOM_WEIGHTS=$${D2M_RANDOM_WEIGHTS-1} .venv/bin/d2m demo

# The UI on loopback only: Dagster's webserver has no authentication (README: Daemon and UI).
ui:
	D2M_RANDOM_WEIGHTS=$${D2M_RANDOM_WEIGHTS-1} .venv/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

test: test-services
	.venv/bin/pytest -q --durations=25 -n 2 --dist worksteal

# The platform tests start a real PostgreSQL server and a real Slurm (slurmctld, slurmd, munge): Debian's
# packages, installed here if missing.
test-services:
	@(ls /usr/lib/postgresql/*/bin/initdb && which slurmctld slurmd munged sbatch) >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
			slurmctld slurmd slurm-client munge >/dev/null)

bench:
	D2M_RANDOM_WEIGHTS=$${D2M_RANDOM_WEIGHTS-1} .venv/bin/d2m bench --yml configs/basic.yml --shards .bench/shards

clean:
	rm -rf .dagster_home .demo .bench
