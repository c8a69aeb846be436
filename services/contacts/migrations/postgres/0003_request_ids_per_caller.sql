-- Request ids are scoped to the caller who sent them (AIP-155): two callers may use the same
-- id, and a retry never reaches another caller's record. Existing ids belong to whoever made
-- the record they created (its first revision's actor).
ALTER TABLE create_requests ADD COLUMN caller_id TEXT NOT NULL DEFAULT '';
UPDATE create_requests SET caller_id = COALESCE(
    (SELECT r.actor FROM revisions r WHERE r.record_id = create_requests.record_id AND r.version = 1), '');
ALTER TABLE create_requests DROP CONSTRAINT create_requests_pkey;
ALTER TABLE create_requests ADD PRIMARY KEY (caller_id, request_id);
