-- Purchase history (SPEC C8), kept from the deals service's events: each won deal per
-- customer, and on the record its count, last purchase time and value per currency.
CREATE TABLE purchases (
    record_type BIGINT NOT NULL,
    record_id   TEXT   NOT NULL,
    deal_id     TEXT   NOT NULL,
    currency    TEXT   NOT NULL,
    amount      BIGINT NOT NULL,
    won_at      BIGINT NOT NULL,
    PRIMARY KEY (record_type, record_id, deal_id)
);

ALTER TABLE companies ADD COLUMN purchase_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE companies ADD COLUMN last_purchase_at BIGINT NOT NULL DEFAULT 0;
-- "EUR:12345,USD:500": minor units per currency.
ALTER TABLE companies ADD COLUMN lifetime_values TEXT NOT NULL DEFAULT '';
ALTER TABLE people ADD COLUMN purchase_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE people ADD COLUMN last_purchase_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE people ADD COLUMN lifetime_values TEXT NOT NULL DEFAULT '';

CREATE INDEX companies_purchased ON companies (last_purchase_at, id);
CREATE INDEX people_purchased ON people (last_purchase_at, id);
