-- What the test handlers do: one row per effect (no unique key, so a second effect shows).
CREATE TABLE effects (event_id TEXT NOT NULL, subject TEXT NOT NULL, handled_at BIGINT NOT NULL);
