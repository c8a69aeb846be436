-- Phone search through its own index: the digits of every phone of a record (E.164 without
-- '+', space-separated) in an FTS5 trigram index of their own; a number typed into a search
-- no longer scans the trigrams of all text. Filled from the duplicate keys, which hold every
-- phone.
ALTER TABLE companies ADD COLUMN phone_digits TEXT NOT NULL DEFAULT '';
ALTER TABLE people ADD COLUMN phone_digits TEXT NOT NULL DEFAULT '';

UPDATE companies SET phone_digits = COALESCE(
    (SELECT group_concat(digits, ' ') FROM (
        SELECT substr(value, 2) AS digits FROM contact_keys
        WHERE record_type = 1 AND field = 'phone' AND record_id = companies.id ORDER BY value)),
    '');
UPDATE people SET phone_digits = COALESCE(
    (SELECT group_concat(digits, ' ') FROM (
        SELECT substr(value, 2) AS digits FROM contact_keys
        WHERE record_type = 2 AND field = 'phone' AND record_id = people.id ORDER BY value)),
    '');

CREATE VIRTUAL TABLE companies_phones USING fts5(phone_digits, content = 'companies', content_rowid = 'seq', tokenize = 'trigram');
CREATE VIRTUAL TABLE people_phones USING fts5(phone_digits, content = 'people', content_rowid = 'seq', tokenize = 'trigram');
INSERT INTO companies_phones (companies_phones) VALUES ('rebuild');
INSERT INTO people_phones (people_phones) VALUES ('rebuild');

CREATE TRIGGER companies_phones_insert AFTER INSERT ON companies BEGIN
    INSERT INTO companies_phones (rowid, phone_digits) VALUES (new.seq, new.phone_digits);
END;
CREATE TRIGGER companies_phones_delete AFTER DELETE ON companies BEGIN
    INSERT INTO companies_phones (companies_phones, rowid, phone_digits) VALUES ('delete', old.seq, old.phone_digits);
END;
CREATE TRIGGER companies_phones_update AFTER UPDATE OF phone_digits ON companies BEGIN
    INSERT INTO companies_phones (companies_phones, rowid, phone_digits) VALUES ('delete', old.seq, old.phone_digits);
    INSERT INTO companies_phones (rowid, phone_digits) VALUES (new.seq, new.phone_digits);
END;
CREATE TRIGGER people_phones_insert AFTER INSERT ON people BEGIN
    INSERT INTO people_phones (rowid, phone_digits) VALUES (new.seq, new.phone_digits);
END;
CREATE TRIGGER people_phones_delete AFTER DELETE ON people BEGIN
    INSERT INTO people_phones (people_phones, rowid, phone_digits) VALUES ('delete', old.seq, old.phone_digits);
END;
CREATE TRIGGER people_phones_update AFTER UPDATE OF phone_digits ON people BEGIN
    INSERT INTO people_phones (people_phones, rowid, phone_digits) VALUES ('delete', old.seq, old.phone_digits);
    INSERT INTO people_phones (rowid, phone_digits) VALUES (new.seq, new.phone_digits);
END;

-- A salesperson's own records (their data scope, or an owner filter) in any order.
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
UPDATE tags SET record_created_at = COALESCE(
    (SELECT created_at FROM people WHERE people.id = tags.record_id),
    (SELECT created_at FROM companies WHERE companies.id = tags.record_id),
    0);
CREATE INDEX tags_created ON tags (tag, record_created_at, record_id);
