-- Reports (D8) and the board's totals.
--
-- A deal keeps the furthest open stage it ever entered (what the funnel counts as "got at least
-- this far") and its lost reason as columns, and the reports' index walks cover what they add up
-- (per owner, so that a head's report reads only their people's entries).

ALTER TABLE deals ADD COLUMN furthest_stage_id TEXT NOT NULL DEFAULT '';
ALTER TABLE deals ADD COLUMN lost_reason TEXT NOT NULL DEFAULT '';

UPDATE deals SET furthest_stage_id = COALESCE((
    SELECT s.id FROM deal_history h JOIN stages s ON s.id = h.to_stage_id
    WHERE h.deal_id = deals.id AND s.kind = 1 ORDER BY s.position DESC LIMIT 1), '');
UPDATE deals SET lost_reason = COALESCE((
    SELECT h.lost_reason FROM deal_history h WHERE h.deal_id = deals.id ORDER BY h.at DESC, h.id DESC LIMIT 1), '')
WHERE status = 3;

-- Per stage, owner and currency: the deals there, their amounts and weighted amounts. Kept in
-- the transaction of every change of a deal, so that a board is a read of a few rows per stage
-- and owner rather than an aggregate over every deal of the pipeline.
CREATE TABLE stage_totals (
    stage_id TEXT   NOT NULL,
    owner_id TEXT   NOT NULL,
    currency TEXT   NOT NULL,
    deals    BIGINT NOT NULL,
    amount   BIGINT NOT NULL,
    weighted BIGINT NOT NULL,
    PRIMARY KEY (stage_id, owner_id, currency)
);

INSERT INTO stage_totals (stage_id, owner_id, currency, deals, amount, weighted)
SELECT stage_id, owner_id, currency, COUNT(*), SUM(amount), SUM((amount * probability + 50) / 100)
FROM deals GROUP BY stage_id, owner_id, currency;

-- The board's totals come from stage_totals now.
DROP INDEX deals_stage_money;

-- By owner and creation (lists, the funnel, conversion), by owner and closing (won and lost,
-- the leaderboard, sources) and by owner and expected close of open deals (the forecast).
DROP INDEX deals_owner;
CREATE INDEX deals_owner ON deals (owner_id, created_at, id)
    INCLUDE (pipeline_id, stage_id, furthest_stage_id, status, currency, amount, probability, closed_at);
CREATE INDEX deals_owner_closed ON deals (owner_id, closed_at)
    INCLUDE (pipeline_id, status, currency, amount, created_at, source) WHERE closed_at > 0;
CREATE INDEX deals_owner_forecast ON deals (owner_id, expected_close)
    INCLUDE (pipeline_id, currency, amount, probability) WHERE status = 1;
