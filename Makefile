# epoxy — common tasks. `make run` starts the proxy with built-in defaults
# (0.0.0.0:8080 -> 127.0.0.1:8081); `make test` runs the checks CI runs.
CARGO ?= cargo
ARGS ?=

.PHONY: build run test bench info debug clean

build:
	$(CARGO) build --release

run: build
	./target/release/proxy $(ARGS)

test:
	$(CARGO) fmt --all -- --check
	# Lints in src/lib.rs: undocumented unsafe blocks, unwrap/expect outside tests.
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --quiet
	$(CARGO) test --release
	# The core data-plane tests once more against two worker loops (SO_REUSEPORT).
	EPOXY_TEST_WORKERS=2 $(CARGO) test --release --test main core::
	# And against a debug build, which checks the worker's invariants after every batch.
	$(CARGO) test --test main core::

bench: build
	bash bench/run.sh

info:
	@uname -a; nproc; ulimit -Hn; $(CARGO) --version; rustc --version
	@./target/release/proxy --version 2>/dev/null || echo "proxy not built yet (make build)"

debug:
	RUST_LOG=debug $(CARGO) run -- $(ARGS)

clean:
	$(CARGO) clean
