//! Schema migrations, applied in order; `PRAGMA user_version` counts how many ran.
//! Append only: never edit a migration that has shipped, add a new one.

/// Migration `i` brings the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: jobs, key registry, orchestrator runs.
    r#"
CREATE TABLE jobs (
    id            TEXT PRIMARY KEY NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('backup', 'restore')),
    spec          TEXT NOT NULL,                       -- request as JSON
    tenant        TEXT NOT NULL,
    subject       TEXT NOT NULL,                       -- VM name, or point for restores
    state         TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at    INTEGER NOT NULL,                    -- Unix milliseconds
    started_at    INTEGER,
    finished_at   INTEGER,
    bytes_done    INTEGER NOT NULL DEFAULT 0,
    bytes_total   INTEGER NOT NULL DEFAULT 0,
    disks         TEXT NOT NULL DEFAULT '[]',          -- per-disk plan/results as JSON
    notes         TEXT NOT NULL DEFAULT '[]',          -- runner notes as a JSON array
    error_code    TEXT,
    error_message TEXT,
    cleanup       TEXT,                                -- what the orphan sweep did
    point_id      TEXT                                 -- restore point made or read
);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_created ON jobs (created_at);

CREATE TABLE key_registry (
    tenant      TEXT NOT NULL,
    kms         TEXT NOT NULL,                         -- KMS address (host:port) or key source name
    key_name    TEXT NOT NULL,
    key_id      TEXT NOT NULL,                         -- KMS object id, never key material
    version     INTEGER NOT NULL,
    checked_at  INTEGER NOT NULL,
    changed_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, kms)
);

CREATE TABLE orch_runs (
    id          TEXT PRIMARY KEY NOT NULL,
    job         TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('backup', 'key_sync')),
    state       TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    summary     TEXT NOT NULL DEFAULT '{}',
    error       TEXT
);
CREATE INDEX orch_runs_job ON orch_runs (job, kind, started_at);

CREATE TABLE orch_run_items (
    run_id       TEXT NOT NULL REFERENCES orch_runs (id) ON DELETE CASCADE,
    item         TEXT NOT NULL,                        -- VM moref, or agent id for key sync
    agent        TEXT,
    agent_job_id TEXT,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'dispatched', 'succeeded', 'failed', 'cancelled', 'refused')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    detail       TEXT NOT NULL DEFAULT '{}',
    error        TEXT,
    bytes        INTEGER NOT NULL DEFAULT 0,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (run_id, item)
);
"#,
    // 2: the console's accounts and audit log; a VM's history by moref.
    r#"
CREATE INDEX orch_run_items_item ON orch_run_items (item, updated_at);

CREATE TABLE console_accounts (
    name          TEXT PRIMARY KEY NOT NULL,
    password_hash TEXT NOT NULL,                       -- argon2id PHC string
    role          TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    tenant        TEXT,                                -- NULL: the provider
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE console_audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,                         -- Unix milliseconds
    account  TEXT NOT NULL,                            -- who ('-' before login)
    tenant   TEXT,                                     -- whose data it touched
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    outcome  TEXT NOT NULL,                            -- ok, refused, failed
    detail   TEXT NOT NULL DEFAULT '',
    remote   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX console_audit_at ON console_audit (at);
"#,
    // 3: verify jobs: the jobs table rebuilt with 'verify' allowed as a kind
    // (SQLite cannot change a CHECK constraint in place).
    r#"
CREATE TABLE jobs_new (
    id            TEXT PRIMARY KEY NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('backup', 'restore', 'verify')),
    spec          TEXT NOT NULL,                       -- request as JSON
    tenant        TEXT NOT NULL,
    subject       TEXT NOT NULL,                       -- VM name, point for restores, point or 'repository' for verifies
    state         TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at    INTEGER NOT NULL,                    -- Unix milliseconds
    started_at    INTEGER,
    finished_at   INTEGER,
    bytes_done    INTEGER NOT NULL DEFAULT 0,
    bytes_total   INTEGER NOT NULL DEFAULT 0,
    disks         TEXT NOT NULL DEFAULT '[]',          -- per-disk plan/results as JSON
    notes         TEXT NOT NULL DEFAULT '[]',          -- runner notes as a JSON array
    error_code    TEXT,
    error_message TEXT,
    cleanup       TEXT,                                -- what the orphan sweep did
    point_id      TEXT                                 -- restore point made or read
);
INSERT INTO jobs_new (id, kind, spec, tenant, subject, state, created_at, started_at,
    finished_at, bytes_done, bytes_total, disks, notes, error_code, error_message,
    cleanup, point_id)
SELECT id, kind, spec, tenant, subject, state, created_at, started_at,
    finished_at, bytes_done, bytes_total, disks, notes, error_code, error_message,
    cleanup, point_id FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_created ON jobs (created_at);
"#,
];
