# migrun: the two commands of the README are `make demo` and `make test`.
# Every target installs what it needs through hack/ (idempotent, quick when done).

SHELL := /bin/bash
CARGO ?= cargo
MIGRUN_BIN := $(CURDIR)/target/release/migrun
export MIGRUN_BIN
export PATH := /usr/local/sbin:/usr/local/bin:$(PATH):/root/.cargo/bin

.PHONY: all deps build lint test unit-test fuzz fuzz-test e2e-test docker-up docker-down docker-up-b docker-down-b docker-up-ab docker-down-ab containerd-up containerd-down demo \
        bench-shim bench bench-quick bench-suite bench-deps bench-test bench-runtime bench-checkpoint bench-migrate bench-tree soak clean

all: build

# The start of a stage of `make test` (CI's log shows where the time went):
# the time, and the seconds since make started.
MAKE_START := $(shell date +%s)
STAGE = @echo "=== $@: start $$(date -u '+%F %T') UTC, $$(( $$(date +%s) - $(MAKE_START) ))s into make"

deps:
	$(STAGE)
	@bash hack/install-deps.sh

build: deps
	$(STAGE)
	$(CARGO) build --release --workspace --bins

lint:
	$(STAGE)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

docker-up: build
	@bash hack/docker.sh up

docker-down:
	@bash hack/docker.sh down

# A second dockerd on this host (own state dir, bridge and subnet), the
# target of the Docker-to-Docker migration tests.
DOCKER_B := MIGRUN_DOCKER_DIR=/var/lib/migrun-docker-b MIGRUN_DOCKER_BRIDGE=mr-docker1 MIGRUN_DOCKER_CIDR=172.31.251.1/24

docker-up-b: build
	@$(DOCKER_B) bash hack/docker.sh up

docker-down-b:
	@$(DOCKER_B) bash hack/docker.sh down

# One dockerd in each test-bed host (network namespaces mr-host-a and
# mr-host-b of hack/testbed.sh): own state dir, socket, bridge and subnet.
docker-up-ab: build
	@bash hack/docker.sh up a
	@bash hack/docker.sh up b

docker-down-ab:
	@bash hack/docker.sh down a
	@bash hack/docker.sh down b

# A containerd of the project's own with the shim containerd-shim-migrun-v1
# (runtime io.containerd.migrun.v1) and busybox:local.
containerd-up: build
	@bash hack/containerd.sh up

containerd-down:
	@bash hack/containerd.sh down

unit-test:
	$(STAGE)
	$(CARGO) test --workspace --exclude migrun-tests

# The fuzz targets of fuzz/ (hack/fuzz.sh): `make fuzz` runs each one for
# FUZZ_SECONDS against its committed corpus, and fails on a crash;
# `make fuzz-test` is the short pass of `make test`, FUZZ_TEST_SECONDS in all.
FUZZ_SECONDS ?= 60
FUZZ_TEST_SECONDS ?= 30

fuzz: deps
	@FUZZ_SECONDS=$(FUZZ_SECONDS) bash hack/fuzz.sh

fuzz-test: deps
	$(STAGE)
	@bash hack/fuzz.sh --no-clippy --total $(FUZZ_TEST_SECONDS)

# Each test binary of tests/ on its own, under its own time limit (a hang
# costs that limit, not CI's time), with its time and a table at the end
# (hack/e2e-test.sh). E2E_TESTS: some of them only, e.g. "containerd bad_input".
E2E_TESTS ?=

e2e-test: build docker-up docker-up-b containerd-up
	$(STAGE)
	@CARGO=$(CARGO) bash hack/e2e-test.sh $(E2E_TESTS)

# The README's test command: lint, unit tests (with the property tests), a
# short pass of each fuzz target, end-to-end tests, and one tiny
# benchmark-suite scenario end to end (hack/bench/selftest.sh).
test: deps build lint unit-test fuzz-test e2e-test bench-test
	@echo "=== test: passed, $$(( $$(date +%s) - $(MAKE_START) ))s in all"

demo: build docker-up
	@bash hack/demo.sh

# The whole benchmark: runtime, checkpoint, migrate and file-sync figures,
# then the live-migration suite (hack/bench/suite.sh), which regenerates
# docs/benchmarks.md. bench-quick: the suite's short version only.
bench: bench-runtime bench-checkpoint bench-migrate bench-tree bench-suite bench-docker

bench-deps: deps
	@bash hack/bench/install.sh

bench-suite: build bench-deps docker-up docker-up-b
	@bash hack/bench/suite.sh

bench-quick: build bench-deps docker-up docker-up-b
	@bash hack/bench/suite.sh --quick

# One tiny scenario through the suite's code; checks every metric is there.
bench-test: build bench-deps
	$(STAGE)
	@bash hack/bench/selftest.sh

bench-runtime: build
	@bash hack/bench-runtime.sh

bench-checkpoint: build
	@bash hack/bench-checkpoint.sh

# Docker-to-Docker migration against docker checkpoint/save/load/start by hand.
bench-docker: build docker-up docker-up-b
	@bash hack/bench-docker.sh

bench-migrate: build
	@bash hack/bench-migrate.sh

# The time cost of confined file access (crates/migrate/src/tree.rs) against
# the path-based sync before it, on the static-web scenario's rootfs; builds
# only its own example (crates/migrate/examples/tree_cost/).
bench-tree: bench-deps
	@bash hack/bench-tree.sh

# Soak (not in make test): SOAK_MOVES (default 500) live migrations back and
# forth of the dirtier and of redis under SET load, the data checked after
# every move (hack/soak.sh); figures in bench/results/<date>/soak/.
soak: build bench-deps
	@bash hack/bench/images.sh dirtier redis
	@bash hack/soak.sh

# The shim against containerd's io.containerd.runc.v2: RSS per container, `ctr run --rm` latency.
bench-shim: build containerd-up
	@bash hack/bench-shim.sh

clean:
	$(CARGO) clean
