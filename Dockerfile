# epoxy container image: the `proxy` binary on a distroless base, as a non-root user.
#
# build: docker build -t epoxy .
# run:   docker run --rm -p 8080:8080 -p 9090:9090 -v "$PWD/my.toml:/etc/epoxy/proxy.toml:ro" epoxy
#
# The build pulls rust:1.95-bookworm and gcr.io/distroless/cc-debian12:nonroot and fetches the
# crates of Cargo.lock from crates.io; it needs BuildKit (the default builder since Docker 23)
# for the cache mounts. See docs/deploy.md ("Docker").
#
# The binary links glibc dynamically (libc, libgcc_s: nothing else, see `ldd`). Builder and
# runtime are both Debian 12, so the glibc it was linked against is the one it runs on; host
# names in the config resolve through glibc as on a Debian host (cluster DNS search domains
# included).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin proxy \
    && install -D -m 0755 target/release/proxy /out/proxy \
    && /out/proxy --version

FROM gcr.io/distroless/cc-debian12:nonroot
# The sample configuration; mount your own over it (a ConfigMap in Kubernetes).
COPY deploy/proxy.toml /etc/epoxy/proxy.toml
COPY --from=builder /out/proxy /usr/local/bin/proxy
# distroless's "nonroot" user, by number so that runAsNonRoot can check it.
USER 65532:65532
# The sample config's listener (app "web") and admin endpoint (/healthz, /readyz, /metrics).
EXPOSE 8080/tcp 9090/tcp
# SIGTERM drains: /readyz turns 503, listeners close after drain_delay, live pairs get
# grace_period. Give `docker stop` a --time (-t) above drain_delay + grace_period (35 s for
# the sample; Docker's default is 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/proxy"]
CMD ["-c", "/etc/epoxy/proxy.toml"]
