-- Deals with their indexed columns beside the document (line items, notes, lost reason), and
-- every stage change. Money is a currency code and minor units.

CREATE TABLE deals (
    id                 TEXT PRIMARY KEY,
    title              TEXT   NOT NULL,
    pipeline_id        TEXT   NOT NULL,
    stage_id           TEXT   NOT NULL,
    status             BIGINT NOT NULL,
    owner_id           TEXT   NOT NULL,
    company_id         TEXT   NOT NULL DEFAULT '',
    person_id          TEXT   NOT NULL DEFAULT '',
    currency           TEXT   NOT NULL DEFAULT '',
    amount             BIGINT NOT NULL DEFAULT 0,
    probability        BIGINT NOT NULL,
    probability_manual BIGINT NOT NULL DEFAULT 0,
    expected_close     TEXT   NOT NULL DEFAULT '',
    source             TEXT   NOT NULL DEFAULT '',
    stage_entered_at   BIGINT NOT NULL,
    -- When an open deal starts rotting in its stage; 9223372036854775807 when it never does.
    rot_at             BIGINT NOT NULL,
    closed_at          BIGINT NOT NULL DEFAULT 0,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    version            BIGINT NOT NULL,
    doc                BLOB NOT NULL
);

-- A board column's cards, newest first, and its totals.
CREATE INDEX deals_stage ON deals (stage_id, created_at, id);
CREATE INDEX deals_stage_money ON deals (stage_id, currency, owner_id, amount, probability);
-- Filters and sorts.
CREATE INDEX deals_pipeline ON deals (pipeline_id, created_at, id);
CREATE INDEX deals_owner ON deals (owner_id, created_at, id);
CREATE INDEX deals_company ON deals (company_id, created_at, id);
CREATE INDEX deals_person ON deals (person_id, created_at, id);
CREATE INDEX deals_created ON deals (created_at, id);
CREATE INDEX deals_updated ON deals (updated_at, id);
CREATE INDEX deals_amount ON deals (amount, id);
CREATE INDEX deals_close ON deals (expected_close, id);
CREATE INDEX deals_rotting ON deals (rot_at, id);

CREATE TABLE deal_history (
    id                  TEXT PRIMARY KEY,
    deal_id             TEXT   NOT NULL,
    from_stage_id       TEXT   NOT NULL DEFAULT '',
    to_stage_id         TEXT   NOT NULL,
    kind                BIGINT NOT NULL,
    actor_id            TEXT   NOT NULL,
    at                  BIGINT NOT NULL,
    seconds_in_previous BIGINT NOT NULL DEFAULT 0,
    lost_reason         TEXT   NOT NULL DEFAULT ''
);

CREATE INDEX deal_history_deal ON deal_history (deal_id, at, id);
