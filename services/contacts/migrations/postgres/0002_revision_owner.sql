-- Data scope over history: the owner a record had at each revision, so that a record's history
-- stays visible to exactly those who may see the record, also after it is deleted.
ALTER TABLE revisions ADD COLUMN owner_id TEXT NOT NULL DEFAULT '';

UPDATE revisions SET owner_id = COALESCE(
    (SELECT owner_id FROM people WHERE people.id = revisions.record_id),
    (SELECT owner_id FROM companies WHERE companies.id = revisions.record_id),
    '');
