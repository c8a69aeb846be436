-- Companies and people share one shape: indexed columns beside the record document.
-- Portable column types only (TEXT, BIGINT, BLOB); times are epoch microseconds.
-- `seq` is the stable rowid the full-text index refers to.
CREATE TABLE companies (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    display_name     TEXT    NOT NULL,
    owner_id         TEXT    NOT NULL DEFAULT '',
    stage            BIGINT  NOT NULL DEFAULT 0,
    source           TEXT    NOT NULL DEFAULT '',
    region           TEXT    NOT NULL DEFAULT '',
    industry         TEXT    NOT NULL DEFAULT '',
    company_id       TEXT    NOT NULL DEFAULT '',
    do_not_contact   BIGINT  NOT NULL DEFAULT 0,
    search_text      TEXT    NOT NULL DEFAULT '',
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    last_activity_at BIGINT  NOT NULL DEFAULT 0,
    version          BIGINT  NOT NULL,
    doc              BLOB    NOT NULL
);

CREATE TABLE people (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    display_name     TEXT    NOT NULL,
    owner_id         TEXT    NOT NULL DEFAULT '',
    stage            BIGINT  NOT NULL DEFAULT 0,
    source           TEXT    NOT NULL DEFAULT '',
    region           TEXT    NOT NULL DEFAULT '',
    industry         TEXT    NOT NULL DEFAULT '',
    company_id       TEXT    NOT NULL DEFAULT '',
    do_not_contact   BIGINT  NOT NULL DEFAULT 0,
    search_text      TEXT    NOT NULL DEFAULT '',
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    last_activity_at BIGINT  NOT NULL DEFAULT 0,
    version          BIGINT  NOT NULL,
    doc              BLOB    NOT NULL
);

CREATE INDEX companies_created ON companies (created_at, id);
CREATE INDEX companies_updated ON companies (updated_at, id);
CREATE INDEX companies_activity ON companies (last_activity_at, id);
CREATE INDEX companies_name ON companies (display_name, id);
CREATE INDEX people_created ON people (created_at, id);
CREATE INDEX people_updated ON people (updated_at, id);
CREATE INDEX people_activity ON people (last_activity_at, id);
CREATE INDEX people_name ON people (display_name, id);

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

-- Text search: FTS5 with the trigram tokenizer (substring match), kept in step by triggers.
CREATE VIRTUAL TABLE companies_fts USING fts5(search_text, content = 'companies', content_rowid = 'seq', tokenize = 'trigram');
CREATE VIRTUAL TABLE people_fts USING fts5(search_text, content = 'people', content_rowid = 'seq', tokenize = 'trigram');

CREATE TRIGGER companies_fts_insert AFTER INSERT ON companies BEGIN
    INSERT INTO companies_fts (rowid, search_text) VALUES (new.seq, new.search_text);
END;
CREATE TRIGGER companies_fts_delete AFTER DELETE ON companies BEGIN
    INSERT INTO companies_fts (companies_fts, rowid, search_text) VALUES ('delete', old.seq, old.search_text);
END;
CREATE TRIGGER companies_fts_update AFTER UPDATE OF search_text ON companies BEGIN
    INSERT INTO companies_fts (companies_fts, rowid, search_text) VALUES ('delete', old.seq, old.search_text);
    INSERT INTO companies_fts (rowid, search_text) VALUES (new.seq, new.search_text);
END;
CREATE TRIGGER people_fts_insert AFTER INSERT ON people BEGIN
    INSERT INTO people_fts (rowid, search_text) VALUES (new.seq, new.search_text);
END;
CREATE TRIGGER people_fts_delete AFTER DELETE ON people BEGIN
    INSERT INTO people_fts (people_fts, rowid, search_text) VALUES ('delete', old.seq, old.search_text);
END;
CREATE TRIGGER people_fts_update AFTER UPDATE OF search_text ON people BEGIN
    INSERT INTO people_fts (people_fts, rowid, search_text) VALUES ('delete', old.seq, old.search_text);
    INSERT INTO people_fts (rowid, search_text) VALUES (new.seq, new.search_text);
END;

CREATE TABLE tags (
    tag       TEXT NOT NULL,
    record_id TEXT NOT NULL,
    PRIMARY KEY (tag, record_id)
);
CREATE INDEX tags_record ON tags (record_id);

CREATE TABLE contact_keys (
    record_type BIGINT NOT NULL,
    field       TEXT   NOT NULL,
    value       TEXT   NOT NULL,
    record_id   TEXT   NOT NULL,
    PRIMARY KEY (record_type, field, value)
);
CREATE INDEX contact_keys_record ON contact_keys (record_id);

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

CREATE TABLE create_requests (
    request_id  TEXT   PRIMARY KEY,
    record_type BIGINT NOT NULL,
    record_id   TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);
