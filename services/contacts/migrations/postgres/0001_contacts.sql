-- Companies and people share one shape: indexed columns beside the record document.
-- Portable column types only (TEXT, BIGINT, BYTEA); times are epoch microseconds.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE companies (
    id               TEXT PRIMARY KEY,
    display_name     TEXT   NOT NULL,
    owner_id         TEXT   NOT NULL DEFAULT '',
    stage            BIGINT NOT NULL DEFAULT 0,
    source           TEXT   NOT NULL DEFAULT '',
    region           TEXT   NOT NULL DEFAULT '',
    industry         TEXT   NOT NULL DEFAULT '',
    company_id       TEXT   NOT NULL DEFAULT '',
    do_not_contact   BIGINT NOT NULL DEFAULT 0,
    search_text      TEXT   NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    last_activity_at BIGINT NOT NULL DEFAULT 0,
    version          BIGINT NOT NULL,
    doc              BYTEA  NOT NULL
);

CREATE TABLE people (LIKE companies INCLUDING DEFAULTS);
ALTER TABLE people ADD PRIMARY KEY (id);

-- Sort orders (keyset pagination walks these).
CREATE INDEX companies_created ON companies (created_at, id);
CREATE INDEX companies_updated ON companies (updated_at, id);
CREATE INDEX companies_activity ON companies (last_activity_at, id);
CREATE INDEX companies_name ON companies (display_name, id);
CREATE INDEX people_created ON people (created_at, id);
CREATE INDEX people_updated ON people (updated_at, id);
CREATE INDEX people_activity ON people (last_activity_at, id);
CREATE INDEX people_name ON people (display_name, id);

-- Filters.
CREATE INDEX companies_owner ON companies (owner_id, created_at, id);
CREATE INDEX companies_stage ON companies (stage, created_at, id);
CREATE INDEX companies_source ON companies (source, created_at, id);
CREATE INDEX companies_region ON companies (region, created_at, id);
CREATE INDEX companies_industry ON companies (industry, created_at, id);
CREATE INDEX people_owner ON people (owner_id, created_at, id);
CREATE INDEX people_stage ON people (stage, created_at, id);
CREATE INDEX people_source ON people (source, created_at, id);
CREATE INDEX people_region ON people (region, created_at, id);
CREATE INDEX people_company ON people (company_id, created_at, id);

-- Text search: substring match through trigrams.
CREATE INDEX companies_search ON companies USING gin (search_text gin_trgm_ops);
CREATE INDEX people_search ON people USING gin (search_text gin_trgm_ops);

-- Tags of companies and people (ids are unique across both).
CREATE TABLE tags (
    tag       TEXT NOT NULL,
    record_id TEXT NOT NULL,
    PRIMARY KEY (tag, record_id)
);
CREATE INDEX tags_record ON tags (record_id);

-- Duplicate protection: a normalised phone, e-mail or company name belongs to one record.
CREATE TABLE contact_keys (
    record_type BIGINT NOT NULL,
    field       TEXT   NOT NULL,
    value       TEXT   NOT NULL,
    record_id   TEXT   NOT NULL,
    PRIMARY KEY (record_type, field, value)
);
CREATE INDEX contact_keys_record ON contact_keys (record_id);

-- Revision history; kept after a record is deleted.
CREATE TABLE revisions (
    record_id   TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    record_type BIGINT NOT NULL,
    action      BIGINT NOT NULL,
    actor       TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    changes     TEXT   NOT NULL,
    PRIMARY KEY (record_id, version)
);

-- Idempotent creation: the record a request_id created.
CREATE TABLE create_requests (
    request_id  TEXT   PRIMARY KEY,
    record_type BIGINT NOT NULL,
    record_id   TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);
