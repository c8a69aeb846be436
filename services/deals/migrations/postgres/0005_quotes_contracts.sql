-- Quotes, contracts, their payment plans and the payments received (D5).

-- A deal's quotes, numbered per deal (quote_no), their state and total beside the document
-- (lines, tax, validity, notes).
CREATE TABLE quotes (
    id         TEXT PRIMARY KEY,
    deal_id    TEXT   NOT NULL,
    quote_no   BIGINT NOT NULL,
    state      BIGINT NOT NULL,
    currency   TEXT   NOT NULL,
    total      BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version    BIGINT NOT NULL,
    doc        BYTEA  NOT NULL,
    UNIQUE (deal_id, quote_no)
);

-- Contracts: the deal's owner and customer when it was made, the value and what was received
-- in its currency.
CREATE TABLE contracts (
    id          TEXT PRIMARY KEY,
    deal_id     TEXT   NOT NULL,
    owner_id    TEXT   NOT NULL,
    company_id  TEXT   NOT NULL DEFAULT '',
    person_id   TEXT   NOT NULL DEFAULT '',
    number      TEXT   NOT NULL,
    -- Lower-cased number: unique.
    number_key  TEXT   NOT NULL UNIQUE,
    signed_date TEXT   NOT NULL,
    currency    TEXT   NOT NULL,
    value       BIGINT NOT NULL,
    received    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    doc         BYTEA  NOT NULL
);

CREATE INDEX contracts_owner ON contracts (owner_id, signed_date, id);
CREATE INDEX contracts_signed ON contracts (signed_date, id);
CREATE INDEX contracts_deal ON contracts (deal_id);
CREATE INDEX contracts_company ON contracts (company_id);
CREATE INDEX contracts_person ON contracts (person_id);

-- A contract's payment plan as rows (the document has it too): what is due by a day is a sum.
CREATE TABLE instalments (
    contract_id TEXT   NOT NULL,
    seq         BIGINT NOT NULL,
    due_date    TEXT   NOT NULL,
    amount      BIGINT NOT NULL,
    PRIMARY KEY (contract_id, seq)
);

CREATE INDEX instalments_due ON instalments (contract_id, due_date, amount);

CREATE TABLE payments (
    id            TEXT PRIMARY KEY,
    contract_id   TEXT   NOT NULL,
    amount        BIGINT NOT NULL,
    received_date TEXT   NOT NULL,
    note          TEXT   NOT NULL DEFAULT '',
    recorded_by   TEXT   NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE INDEX payments_contract ON payments (contract_id, created_at, id);
