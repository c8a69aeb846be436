-- When the last activity record on a deal happened (the tasks service's ActivityLogged): a deal
-- in a stage with a rotting threshold rots that many days after it entered the stage or after
-- its last activity, whichever is later. 0: none yet.
ALTER TABLE deals ADD COLUMN last_activity_at BIGINT NOT NULL DEFAULT 0;
