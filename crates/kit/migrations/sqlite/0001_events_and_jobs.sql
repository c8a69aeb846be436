-- Tables every service has (kit's own migrations, tracked in _crm_kit_migrations).

-- Events a change committed, until every consumer group has them (kit::events).
CREATE TABLE outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    envelope BLOB NOT NULL,
    -- Publication order, assigned by the relay; NULL until published.
    seq BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (position) WHERE seq IS NULL;
CREATE INDEX outbox_published ON outbox (seq) WHERE seq IS NOT NULL;

-- The relay's counter (one row); locking it makes one relay publish at a time.
CREATE TABLE outbox_relay (
    id BIGINT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
INSERT INTO outbox_relay (id, last_seq) VALUES (1, 0);

-- How far each consumer group reading this outbox through the database has come (the
-- embedded transport), so that the relay keeps what a group has not read.
CREATE TABLE outbox_cursors (
    consumer TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Events this service's consumers have had their effect for (one effect per event).
CREATE TABLE processed_events (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX processed_events_age ON processed_events (processed_at);

-- Events whose handler kept failing, parked with the last error until retried.
CREATE TABLE dead_letters (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    event_type TEXT NOT NULL,
    envelope BLOB NOT NULL,
    attempts BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    failed_at BIGINT NOT NULL,
    retry_requested_at BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, event_id)
);

-- Durable scheduled work, claimed with a lease (kit::jobs).
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    -- Unique per kind when set: scheduling the same key again moves the job.
    job_key TEXT,
    due_at BIGINT NOT NULL,
    payload BLOB NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    lease_until BIGINT NOT NULL DEFAULT 0,
    leased_by TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    -- 0 waiting, 1 failed for good.
    dead BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX jobs_key ON jobs (kind, job_key);
CREATE INDEX jobs_due ON jobs (due_at) WHERE dead = 0;
