-- Request ids are scoped to the caller who sent them (AIP-155): two callers may use the same
-- id, and a retry never reaches another caller's record. Existing ids belong to whoever made
-- the record they created (its first revision's actor).
CREATE TABLE create_requests_per_caller (
    caller_id   TEXT   NOT NULL,
    request_id  TEXT   NOT NULL,
    record_type BIGINT NOT NULL,
    record_id   TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (caller_id, request_id)
);
INSERT INTO create_requests_per_caller (caller_id, request_id, record_type, record_id, created_at)
SELECT COALESCE(
           (SELECT r.actor FROM revisions r WHERE r.record_id = c.record_id AND r.version = 1), ''),
       c.request_id, c.record_type, c.record_id, c.created_at
FROM create_requests c;
DROP TABLE create_requests;
ALTER TABLE create_requests_per_caller RENAME TO create_requests;
