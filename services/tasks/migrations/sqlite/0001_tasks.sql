-- Tasks, activity records and comments: indexed columns beside the record document (the
-- protobuf message without what the columns hold). Times are epoch microseconds.

CREATE TABLE tasks (
    id              TEXT PRIMARY KEY,
    title           TEXT   NOT NULL,
    kind            BIGINT NOT NULL,
    status          BIGINT NOT NULL,
    priority        BIGINT NOT NULL,
    assignee_id     TEXT   NOT NULL,
    creator_id      TEXT   NOT NULL,
    -- 9223372036854775807 when the task has none: it sorts after every dated task and matches
    -- no upper bound of a due range.
    due_at          BIGINT NOT NULL,
    customer_id     TEXT   NOT NULL DEFAULT '',
    deal_id         TEXT   NOT NULL DEFAULT '',
    handover_needed BIGINT NOT NULL DEFAULT 0,
    comment_count   BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    closed_at       BIGINT NOT NULL DEFAULT 0,
    version         BIGINT NOT NULL,
    doc             BLOB    NOT NULL
);

-- "My open tasks by due time", and every assignee filter with a sort.
CREATE INDEX tasks_assignee_due ON tasks (assignee_id, status, due_at, id);
CREATE INDEX tasks_assignee_created ON tasks (assignee_id, created_at, id);
CREATE INDEX tasks_creator ON tasks (creator_id, created_at, id);
CREATE INDEX tasks_customer ON tasks (customer_id, due_at, id);
CREATE INDEX tasks_deal ON tasks (deal_id, due_at, id);
-- Overdue tasks, and the sorts.
CREATE INDEX tasks_status_due ON tasks (status, due_at, id);
CREATE INDEX tasks_created ON tasks (created_at, id);
CREATE INDEX tasks_updated ON tasks (updated_at, id);
CREATE INDEX tasks_priority ON tasks (priority, id);

CREATE TABLE activities (
    id            TEXT PRIMARY KEY,
    kind          BIGINT NOT NULL,
    author_id     TEXT   NOT NULL,
    department_id TEXT   NOT NULL DEFAULT '',
    customer_id   TEXT   NOT NULL DEFAULT '',
    deal_id       TEXT   NOT NULL DEFAULT '',
    task_id       TEXT   NOT NULL DEFAULT '',
    occurred_at   BIGINT NOT NULL,
    -- YYYY-MM-DD in the record's time zone: the day it counts for in the supervision views.
    occur_date    TEXT   NOT NULL,
    comment_count BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    doc           BLOB    NOT NULL
);

-- Timelines (a customer's, a deal's, a user's, a department's), newest first.
CREATE INDEX activities_occurred ON activities (occurred_at, id);
CREATE INDEX activities_author ON activities (author_id, occurred_at, id);
CREATE INDEX activities_department ON activities (department_id, occurred_at, id);
CREATE INDEX activities_customer ON activities (customer_id, occurred_at, id);
CREATE INDEX activities_deal ON activities (deal_id, occurred_at, id);
CREATE INDEX activities_task ON activities (task_id, occurred_at, id);
-- Per-user daily counts: aggregates read from these indexes alone (the department in the
-- authors' one too, so that counts of a department's authors never read the table).
CREATE INDEX activities_department_days ON activities (department_id, occur_date, author_id, kind);
CREATE INDEX activities_author_days ON activities (author_id, occur_date, kind, department_id);

CREATE TABLE comments (
    id           TEXT PRIMARY KEY,
    subject_type BIGINT NOT NULL,
    subject_id   TEXT   NOT NULL,
    author_id    TEXT   NOT NULL,
    body         TEXT   NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE INDEX comments_subject ON comments (subject_type, subject_id, created_at, id);

-- Idempotent creation (AIP-155), per caller.
CREATE TABLE create_requests (
    caller_id   TEXT   NOT NULL,
    request_id  TEXT   NOT NULL,
    record_type BIGINT NOT NULL,
    record_id   TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (caller_id, request_id)
);
