# syntax=docker/dockerfile:1
# Multi-stage build of the operator image: `docker build -t philotes:dev .`
# The build runs the same `cargo build --release` CI runs; dependencies are cached in a
# layer of their own, rebuilt only when Cargo.toml or Cargo.lock change.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The shipped binary carries no debug info and no symbols (about 21 MB instead of about
# 150 MB); the release profile in Cargo.toml keeps line tables for local profiling.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
# 1. Dependencies only, against a stub crate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src migrations examples \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
# 2. The real sources.
COPY src src
COPY migrations migrations
COPY build.rs build.rs
COPY examples examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin philotes

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/philotes /usr/local/bin/philotes
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/philotes"]
CMD ["controller"]
