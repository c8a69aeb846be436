-- Pipelines and their stages, and the product catalogue. Times are epoch microseconds.

CREATE TABLE pipelines (
    id            TEXT PRIMARY KEY,
    name          TEXT   NOT NULL,
    -- Lower-cased name: unique.
    name_key      TEXT   NOT NULL UNIQUE,
    department_id TEXT   NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    version       BIGINT NOT NULL
);

CREATE TABLE stages (
    id           TEXT PRIMARY KEY,
    pipeline_id  TEXT   NOT NULL REFERENCES pipelines (id) ON DELETE CASCADE,
    name         TEXT   NOT NULL,
    -- 1-based order within the pipeline, rewritten whole when stages move.
    position     BIGINT NOT NULL,
    probability  BIGINT NOT NULL,
    kind         BIGINT NOT NULL,
    rotting_days BIGINT NOT NULL DEFAULT 0,
    -- Fields a deal needs to enter the stage, comma-separated.
    required_fields TEXT NOT NULL DEFAULT '',
    -- The stage's automations: an encoded Stage message holding only them.
    automations BLOB NOT NULL DEFAULT ''
);

CREATE INDEX stages_pipeline ON stages (pipeline_id, position);

CREATE TABLE products (
    id         TEXT PRIMARY KEY,
    name       TEXT   NOT NULL,
    -- Lower-cased: what the name's order and search use.
    name_key   TEXT   NOT NULL,
    -- Lower-cased SKU; empty when none. Unique when set.
    sku_key    TEXT   NOT NULL DEFAULT '',
    active     BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version    BIGINT NOT NULL,
    doc        BLOB NOT NULL
);

CREATE UNIQUE INDEX products_sku ON products (sku_key) WHERE sku_key <> '';
CREATE INDEX products_name ON products (name_key, id);

-- Idempotent creation (AIP-155), per caller.
CREATE TABLE create_requests (
    caller_id   TEXT   NOT NULL,
    request_id  TEXT   NOT NULL,
    record_type BIGINT NOT NULL,
    record_id   TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (caller_id, request_id)
);
