# epoxy — common tasks. `make run` starts the proxy with built-in defaults
# (0.0.0.0:8080 -> 127.0.0.1:8081); `make test` runs the checks CI runs.
CARGO ?= cargo
ARGS ?=

.PHONY: build run test bench fuzz info debug clean

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
	# The core data-plane tests once more against two worker loops (SO_REUSEPORT), and once
	# with the buffer path only (--no-splice; the default, splice = "auto", switches bulk
	# directions to kernel pipes).
	EPOXY_TEST_WORKERS=2 $(CARGO) test --release --test main core::
	EPOXY_TEST_SPLICE=off $(CARGO) test --release --test main core::
	# And against a debug build, which checks the worker's invariants after every batch
	# (core data plane, and the preface path of the edge features).
	$(CARGO) test --test main -- core:: edge::

# Fuzz every parser for FUZZ_SECONDS each (libFuzzer via cargo-fuzz on the stable toolchain:
# RUSTC_BOOTSTRAP=1 lets it pass its -Z flags, --sanitizer none needs no nightly runtime).
# New inputs go to fuzz/work/TARGET; the committed seeds in fuzz/corpus/TARGET are replayed
# by `make test`. Exits non-zero on the first crash (the input is in fuzz/artifacts/).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = proxy_header client_hello config_toml config_json config_pipe pair_record
fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --sanitizer none -O $$t fuzz/work/$$t fuzz/corpus/$$t \
	    -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

bench: build
	bash bench/run.sh

info:
	@uname -a; nproc; ulimit -Hn; $(CARGO) --version; rustc --version
	@./target/release/proxy --version 2>/dev/null || echo "proxy not built yet (make build)"

debug:
	RUST_LOG=debug $(CARGO) run -- $(ARGS)

clean:
	$(CARGO) clean
