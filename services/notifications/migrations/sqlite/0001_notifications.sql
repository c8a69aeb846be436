-- Each user's inbox: the sequence of their newest notification and how many are unread. Its row
-- is locked by every new notification of the user, so sequences follow commit order (a
-- subscriber resuming after one misses nothing committed later with a smaller number).
CREATE TABLE inboxes (
    recipient_id TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    unread BIGINT NOT NULL
);

CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    recipient_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    -- seq, plus 2^40 while unread: "unread first, newest first" is one descending index walk.
    rank BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    source TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    read_at BIGINT NOT NULL DEFAULT 0
);
-- At most one inbox entry per event and recipient, whatever redelivers the event.
CREATE UNIQUE INDEX notifications_once ON notifications (event_id, recipient_id);
CREATE UNIQUE INDEX notifications_seq ON notifications (recipient_id, seq);
CREATE INDEX notifications_rank ON notifications (recipient_id, rank);

-- A user's language; channels per event type they chose (the others: the event type's default).
CREATE TABLE user_settings (
    user_id TEXT PRIMARY KEY,
    locale TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE preferences (
    user_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    -- Channel numbers, comma-separated ("1,2"); empty: none.
    channels TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, event_type)
);

-- Administrators' settings of an event type (absent: as shipped).
CREATE TABLE event_types (
    name TEXT PRIMARY KEY,
    default_channels TEXT NOT NULL,
    mandatory_in_app BIGINT NOT NULL,
    enabled BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);

-- Administrators' templates (absent: the shipped one).
CREATE TABLE templates (
    event_type TEXT NOT NULL,
    channel BIGINT NOT NULL,
    locale TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (event_type, channel, locale)
);

-- A notification on a channel outside the inbox (e-mail), sent by a leased job.
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    notification_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    recipient_id TEXT NOT NULL,
    channel BIGINT NOT NULL,
    state BIGINT NOT NULL,
    -- The event's variables (JSON), rendered with the template in use at each attempt.
    variables TEXT NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    -- Attempts since it was created or last retried by an administrator (the retry schedule's
    -- position); the log below keeps every attempt.
    round_attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    sent_at BIGINT NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
-- At most one delivery per event, recipient and channel.
CREATE UNIQUE INDEX deliveries_once ON deliveries (event_id, recipient_id, channel);
CREATE INDEX deliveries_created ON deliveries (created_at, id);
CREATE INDEX deliveries_state ON deliveries (state, channel, created_at, id);

CREATE TABLE delivery_attempts (
    delivery_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    latency_micros BIGINT NOT NULL DEFAULT 0,
    -- "sending" while under way; then "sent", "failed" or "interrupted".
    outcome TEXT NOT NULL,
    response_code BIGINT NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (delivery_id, number)
);

-- Outgoing webhook subscriptions. The secret signs deliveries (Standard Webhooks); after a
-- rotation the previous one signs too until `previous_until`.
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    -- Full event names, comma-separated.
    event_types TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    description TEXT NOT NULL,
    secret TEXT NOT NULL,
    previous_secret TEXT NOT NULL DEFAULT '',
    previous_until BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
