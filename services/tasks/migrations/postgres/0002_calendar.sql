-- The calendar (SPEC T2): meetings and calls, who takes part (the organizer included, with the
-- event's times copied so that an agenda is read from one index), and each user's feed secret.

CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    kind         BIGINT NOT NULL,
    title        TEXT   NOT NULL,
    organizer_id TEXT   NOT NULL,
    start_at     BIGINT NOT NULL,
    end_at       BIGINT NOT NULL,
    customer_id  TEXT   NOT NULL DEFAULT '',
    deal_id      TEXT   NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    doc          BYTEA NOT NULL
);

CREATE INDEX events_organizer ON events (organizer_id, start_at, id);
CREATE INDEX events_customer ON events (customer_id, start_at, id);

CREATE TABLE event_attendees (
    event_id TEXT   NOT NULL,
    user_id  TEXT   NOT NULL,
    start_at BIGINT NOT NULL,
    end_at   BIGINT NOT NULL,
    PRIMARY KEY (event_id, user_id)
);

-- A user's agenda: their events by start time.
CREATE INDEX event_attendees_user ON event_attendees (user_id, start_at, event_id);

-- One feed per user; only the token's SHA-256 is kept.
CREATE TABLE calendar_feeds (
    user_id    TEXT PRIMARY KEY,
    token_hash TEXT   NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
