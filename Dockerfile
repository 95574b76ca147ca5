# syntax=docker/dockerfile:1
# fhir-bulk-proxy container image.
#
#   docker build -t fhir-bulk-proxy .
#   docker run -v ./proxy.toml:/etc/fhir-bulk-proxy/proxy.toml:ro -v fbp-data:/var/lib/fhir-bulk-proxy \
#     -p 8080:8080 fhir-bulk-proxy
#
# The image holds no configuration: mount one at /etc/fhir-bulk-proxy/proxy.toml (see config/example.toml;
# in a container set server.listen = "0.0.0.0:8080", admin.listen = "0.0.0.0:9090" and
# export.data_dir = "/var/lib/fhir-bulk-proxy"; deploy/kubernetes/base/proxy.toml does).

# Same toolchain as CI (rustc 1.95); bookworm matches the glibc of the distroless run stage.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# BuildKit cache mounts keep the crate registry and target/ between builds, so a source change recompiles
# only this crate. target/ is a cache mount, so the binary is copied out in the same step.
# The build command is the one .ci/validate-deploy runs; keep the two the same.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/fhir-bulk-proxy /out/usr/local/bin/fhir-bulk-proxy \
    && mkdir -p /out/var/lib/fhir-bulk-proxy

# The binary uses rustls (no OpenSSL): it needs only glibc and libgcc, which the "cc" image has.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="fhir-bulk-proxy" \
      org.opencontainers.image.description="Reverse-proxy sidecar that adds FHIR Bulk Data \$export to a FHIR R4 server that lacks it" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/usr/local/bin/fhir-bulk-proxy /usr/local/bin/fhir-bulk-proxy
# The data directory (job store, NDJSON files, generated token key) is the only place the proxy writes,
# so the root filesystem can be mounted read-only. It is the working directory too: a config that leaves
# export.data_dir at its default ("./data") still writes inside the volume.
COPY --from=build --chown=65532:65532 /out/var/lib/fhir-bulk-proxy /var/lib/fhir-bulk-proxy
WORKDIR /var/lib/fhir-bulk-proxy
VOLUME ["/var/lib/fhir-bulk-proxy"]
# Numeric, so that Kubernetes' runAsNonRoot can check it (the distroless "nonroot" user).
USER 65532:65532
# 8080: FHIR clients (server.listen). 9090: admin listener (admin.listen: health probes, metrics, jobs).
EXPOSE 8080 9090
# SIGTERM starts a graceful shutdown: in-flight requests get server.shutdown_grace_secs to finish, running
# exports stop at a committed page and resume on the next start.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fhir-bulk-proxy"]
CMD ["serve", "--config", "/etc/fhir-bulk-proxy/proxy.toml"]
