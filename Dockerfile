# One image for every role of the suite: `crm serve <role>` (auth, contacts, notifications,
# tasks, deals, gateway), `crm migrate <role>` for the migration Jobs, and the client commands.
#
#   docker build -t crm:0.1.0 .
#   docker run --rm crm:0.1.0 serve --help
#
# The Helm chart in helm/crm runs it on Kubernetes.

# --- build -------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace (every member's manifest is needed); .dockerignore keeps target/ and
# local data out of the context.
COPY . .
RUN cargo build --release --locked --bin crm \
    && install -D -m 0755 target/release/crm /out/crm

# --- runtime -----------------------------------------------------------------------------------
# glibc, libgcc and CA certificates, no shell, no package manager; the same Debian release as
# the builder, so the binary's glibc matches.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/crm /usr/local/bin/crm
# The process writes nothing to disk in cluster mode: a read-only root filesystem is fine.
USER 65532:65532
# The gateway's default port; the other roles listen on 50051-50056 (see the chart).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/crm"]
CMD ["--help"]
