-- The organisation, credentials, refresh tokens, signing keys and the security audit.
-- Portable column types only (TEXT, BIGINT, BLOB); times are epoch microseconds (0: never);
-- an absent reference is ''.

-- The department tree: parent_id '' is a top-level department.
CREATE TABLE departments (
    id         TEXT   PRIMARY KEY,
    name       TEXT   NOT NULL,
    parent_id  TEXT   NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version    BIGINT NOT NULL
);
CREATE INDEX departments_name ON departments (name, id);
CREATE INDEX departments_parent ON departments (parent_id, name, id);

-- E-mail is stored trimmed and lower-cased, so the unique index compares normalised addresses.
CREATE TABLE users (
    id              TEXT   PRIMARY KEY,
    email           TEXT   NOT NULL UNIQUE,
    display_name    TEXT   NOT NULL,
    phone           TEXT   NOT NULL DEFAULT '',
    department_id   TEXT   NOT NULL DEFAULT '',
    supervisor_id   TEXT   NOT NULL DEFAULT '',
    active          BIGINT NOT NULL DEFAULT 1,
    password_hash   TEXT   NOT NULL,
    failed_sign_ins BIGINT NOT NULL DEFAULT 0,
    locked_until    BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    version         BIGINT NOT NULL
);
CREATE INDEX users_name ON users (display_name, id);
CREATE INDEX users_department ON users (department_id, display_name, id);
CREATE INDEX users_supervisor ON users (supervisor_id, display_name, id);

-- name_key (trimmed, lower-cased name) makes role names unique regardless of case.
CREATE TABLE roles (
    id          TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL,
    name_key    TEXT   NOT NULL UNIQUE,
    permissions TEXT   NOT NULL,
    data_scope  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    version     BIGINT NOT NULL
);
CREATE INDEX roles_name ON roles (name, id);

CREATE TABLE user_roles (
    user_id TEXT NOT NULL REFERENCES users (id),
    role_id TEXT NOT NULL REFERENCES roles (id),
    PRIMARY KEY (user_id, role_id)
);
CREATE INDEX user_roles_role ON user_roles (role_id);

-- The client secret is kept only as its SHA-256.
CREATE TABLE service_accounts (
    id          TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL,
    client_id   TEXT   NOT NULL UNIQUE,
    secret_hash BLOB   NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX service_accounts_name ON service_accounts (name, id);

CREATE TABLE service_account_roles (
    account_id TEXT NOT NULL REFERENCES service_accounts (id) ON DELETE CASCADE,
    role_id    TEXT NOT NULL REFERENCES roles (id),
    PRIMARY KEY (account_id, role_id)
);
CREATE INDEX service_account_roles_role ON service_account_roles (role_id);

-- One family per sign-in; revoking it revokes every refresh token descended from that sign-in.
CREATE TABLE refresh_families (
    id         TEXT   PRIMARY KEY,
    user_id    TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX refresh_families_user ON refresh_families (user_id, revoked_at);

-- Refresh tokens are kept only as their SHA-256; used_at marks a token exchanged once.
CREATE TABLE refresh_tokens (
    token_hash BLOB   PRIMARY KEY,
    family_id  TEXT   NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
    user_id    TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);

-- Ed25519 signing keys; the newest one not retired signs.
CREATE TABLE signing_keys (
    kid        TEXT   PRIMARY KEY,
    pkcs8      BLOB   NOT NULL,
    public_x   TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX signing_keys_retired ON signing_keys (retired_at, created_at);

-- The security audit, listed newest first.
CREATE TABLE security_events (
    id             TEXT   PRIMARY KEY,
    event_type     TEXT   NOT NULL,
    occurred_at    BIGINT NOT NULL,
    actor_id       TEXT   NOT NULL DEFAULT '',
    user_id        TEXT   NOT NULL DEFAULT '',
    email          TEXT   NOT NULL DEFAULT '',
    client_address TEXT   NOT NULL DEFAULT '',
    detail         TEXT   NOT NULL DEFAULT ''
);
CREATE INDEX security_events_time ON security_events (occurred_at, id);
CREATE INDEX security_events_type ON security_events (event_type, occurred_at, id);
CREATE INDEX security_events_user ON security_events (user_id, occurred_at, id);
CREATE INDEX security_events_actor ON security_events (actor_id, occurred_at, id);
