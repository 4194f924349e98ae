# Portcullis in a container: a static-enough release build on Debian, run as a non-root user in
# a distroless image (no shell, no package manager). Build: docker build -t portcullis .
# Run:   docker run -p 8080:8080 -v $PWD/portcullis.yaml:/etc/portcullis/portcullis.yaml:ro \
#          -e PORTCULLIS_TOKEN=... portcullis
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in auth load hotpath; do echo 'fn main() {}' > benches/$b.rs; done \
    && cargo build --release --locked --bin portcullis || true
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin portcullis

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
# The token store and the audit file go beside the config unless it says otherwise: mount a
# writable volume here and name it in the config (store.path, audit.file).
WORKDIR /var/lib/portcullis
USER nonroot:nonroot
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["serve", "--config", "/etc/portcullis/portcullis.yaml", "--listen", "0.0.0.0:8080"]
