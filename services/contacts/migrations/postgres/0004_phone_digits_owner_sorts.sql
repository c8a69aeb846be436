-- Phone search through its own index: the digits of every phone of a record (E.164 without
-- '+', space-separated), matched by substring through trigrams of digits only; a number typed
-- into a search no longer scans the trigrams of all text. Filled from the duplicate keys,
-- which hold every phone.
ALTER TABLE companies ADD COLUMN phone_digits TEXT NOT NULL DEFAULT '';
ALTER TABLE people ADD COLUMN phone_digits TEXT NOT NULL DEFAULT '';

UPDATE companies SET phone_digits = k.digits
FROM (SELECT record_id, string_agg(substr(value, 2), ' ' ORDER BY value) AS digits
      FROM contact_keys WHERE record_type = 1 AND field = 'phone' GROUP BY record_id) k
WHERE companies.id = k.record_id;
UPDATE people SET phone_digits = k.digits
FROM (SELECT record_id, string_agg(substr(value, 2), ' ' ORDER BY value) AS digits
      FROM contact_keys WHERE record_type = 2 AND field = 'phone' GROUP BY record_id) k
WHERE people.id = k.record_id;

CREATE INDEX companies_phones ON companies USING gin (phone_digits gin_trgm_ops);
CREATE INDEX people_phones ON people USING gin (phone_digits gin_trgm_ops);

-- A salesperson's own records (their data scope, or an owner filter) in any order: an index
-- walk per sort, not a walk of everyone's records skipping all but one owner's.
CREATE INDEX companies_owner_updated ON companies (owner_id, updated_at, id);
CREATE INDEX companies_owner_activity ON companies (owner_id, last_activity_at, id);
CREATE INDEX companies_owner_name ON companies (owner_id, display_name, id);
CREATE INDEX people_owner_updated ON people (owner_id, updated_at, id);
CREATE INDEX people_owner_activity ON people (owner_id, last_activity_at, id);
CREATE INDEX people_owner_name ON people (owner_id, display_name, id);

-- Few records are marked "do not contact": listing them reads only them.
CREATE INDEX companies_do_not_contact ON companies (created_at, id) WHERE do_not_contact = 1;
CREATE INDEX people_do_not_contact ON people (created_at, id) WHERE do_not_contact = 1;

-- A tag filter probes each listed row's tags: by record and tag in the index alone.
DROP INDEX tags_record;
CREATE INDEX tags_record ON tags (record_id, tag);

-- A listing in creation order that requires a tag walks the tag's entries in that order, each
-- carrying its record's creation time (which never changes), rather than every record in that
-- order probing each one's tags.
ALTER TABLE tags ADD COLUMN record_created_at BIGINT NOT NULL DEFAULT 0;
UPDATE tags SET record_created_at = r.created_at
FROM (SELECT id, created_at FROM people UNION ALL SELECT id, created_at FROM companies) r
WHERE tags.record_id = r.id;
CREATE INDEX tags_created ON tags (tag, record_created_at, record_id);
