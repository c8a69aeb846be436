-- Who heads a department: the supervisor of last resort (an overdue task of someone without a
-- supervisor of their own escalates to their department's head).
ALTER TABLE departments ADD COLUMN head_id TEXT NOT NULL DEFAULT '';
