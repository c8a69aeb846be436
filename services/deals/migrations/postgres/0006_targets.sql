-- Targets (D7): a goal per user or department (the other id empty), period ("2026-12",
-- "2026-Q4"), metric and currency.
CREATE TABLE targets (
    id            TEXT PRIMARY KEY,
    user_id       TEXT   NOT NULL DEFAULT '',
    department_id TEXT   NOT NULL DEFAULT '',
    period        TEXT   NOT NULL,
    metric        BIGINT NOT NULL,
    currency      TEXT   NOT NULL,
    amount        BIGINT NOT NULL,
    time_zone     TEXT   NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    UNIQUE (user_id, department_id, period, metric, currency)
);

CREATE INDEX targets_department ON targets (department_id, period);
