-- The records marked do-not-contact are few (0.1% of the seeded people); a listing of them was
-- a walk of their index in creation order, and any other order (by update, by last activity, by
-- name) read all of them and sorted: at 1M people, 1,000 records read for a page of 50, 1.5-2 ms
-- of the database each, over 10 ms at p99 with 8 listings in flight. Each order now has its own
-- partial index of them, as small as they are few.
CREATE INDEX people_do_not_contact_updated ON people (updated_at, id) WHERE do_not_contact = 1;
CREATE INDEX people_do_not_contact_activity ON people (last_activity_at, id) WHERE do_not_contact = 1;
CREATE INDEX people_do_not_contact_name ON people (display_name, id) WHERE do_not_contact = 1;
CREATE INDEX companies_do_not_contact_updated ON companies (updated_at, id) WHERE do_not_contact = 1;
CREATE INDEX companies_do_not_contact_activity ON companies (last_activity_at, id) WHERE do_not_contact = 1;
CREATE INDEX companies_do_not_contact_name ON companies (display_name, id) WHERE do_not_contact = 1;
