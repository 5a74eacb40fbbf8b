# syntax=docker/dockerfile:1
# The one pollcast binary on a minimal, non-root runtime image.
#   docker build -t pollcast .
#   docker run --rm -p 8080:8080 pollcast serve --listen 0.0.0.0:8080
# The Helm chart (helm/pollcast) runs this image with a read-only root file
# system; pollcast writes only under POLLCAST_DATA_DIR (/data).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: source edits then rebuild only ours.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY migrations migrations
COPY tests tests
COPY bench bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pollcast --bin pollcast \
    && install -D target/release/pollcast /out/pollcast \
    && mkdir -p /out/data

# glibc and CA certificates, no shell, uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/pollcast /usr/local/bin/pollcast
# Writable by the runtime user: the SQLite default and a stored secret live here
# when no volume is mounted.
COPY --from=build --chown=65532:65532 /out/data /data
ENV POLLCAST_LISTEN=0.0.0.0:8080 \
    POLLCAST_DATA_DIR=/data
WORKDIR /data
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/pollcast"]
CMD ["serve"]
