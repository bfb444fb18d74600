# PostgreSQL 15 with the wal2json output plugin (the Debian package of the PGDG repository
# that the official image already has configured). Settings are passed on the command line
# by compose.yaml; see deploy/postgresql.conf for what each one is for.
FROM postgres:15-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}-wal2json" \
    && rm -rf /var/lib/apt/lists/*
