-- The probe's effects: one row per handled event or fired job, no unique key, so that a second
-- effect would show.
CREATE TABLE probe_effects (
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    subject TEXT NOT NULL,
    worker TEXT NOT NULL
);
