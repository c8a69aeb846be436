-- A listing that requires a tag walks the tag's entries in creation order (tags_created). Those
-- of companies and of people lay in one range, so listing companies walked every person's entry
-- of the tag as well. Each entry now carries its record's type and the walk is over one type's.
-- Existing entries are people's but for companies'. (SQLite cannot drop a column's default;
-- every insert names the type.)
ALTER TABLE tags ADD COLUMN record_type BIGINT NOT NULL DEFAULT 2;
UPDATE tags SET record_type = 1 WHERE record_id IN (SELECT id FROM companies);
CREATE INDEX tags_kind_created ON tags (record_type, tag, record_created_at, record_id);
DROP INDEX tags_created;
