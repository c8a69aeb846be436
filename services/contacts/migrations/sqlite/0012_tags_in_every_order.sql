-- A listing that requires a tag walked the tag's entries in creation order only; sorted by
-- update, last activity or name, it walked that order's index over all records and looked up
-- each one's tags. Each entry now carries every key its record is sorted by (kept with it on
-- every write), and each order has an index of a tag's entries, the record's stage last: every
-- column such a walk reads is in its index, and one index per order serves a tag alone and a
-- tag at one stage (tags_kind_stage_created is dropped).
ALTER TABLE tags ADD COLUMN record_updated_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tags ADD COLUMN record_activity_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tags ADD COLUMN record_name TEXT NOT NULL DEFAULT '';
UPDATE tags SET (record_updated_at, record_activity_at, record_name) =
    (SELECT updated_at, last_activity_at, display_name FROM people WHERE people.id = tags.record_id)
    WHERE record_type = 2;
UPDATE tags SET (record_updated_at, record_activity_at, record_name) =
    (SELECT updated_at, last_activity_at, display_name FROM companies WHERE companies.id = tags.record_id)
    WHERE record_type = 1;
DROP INDEX tags_kind_created;
DROP INDEX tags_kind_stage_created;
CREATE INDEX tags_kind_created ON tags (record_type, tag, record_created_at, record_id, record_stage);
CREATE INDEX tags_kind_updated ON tags (record_type, tag, record_updated_at, record_id, record_stage);
CREATE INDEX tags_kind_activity ON tags (record_type, tag, record_activity_at, record_id, record_stage);
CREATE INDEX tags_kind_name ON tags (record_type, tag, record_name, record_id, record_stage);
