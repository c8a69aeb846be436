-- The summary of a customer's last activity record (logged in the tasks service), beside its
-- time: kept by the service from the tasks service's events, not by users' edits.
ALTER TABLE companies ADD COLUMN last_activity_summary TEXT NOT NULL DEFAULT '';
ALTER TABLE people ADD COLUMN last_activity_summary TEXT NOT NULL DEFAULT '';
