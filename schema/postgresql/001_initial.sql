-- Instances, their checkpoints, events and signals. Times are integer milliseconds since the epoch.
CREATE TABLE instances (
    instance_id     TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'suspended', 'completed', 'failed', 'cancelled')),
    checkpoint_id   TEXT,
    created_at_ms   BIGINT NOT NULL,
    started_at_ms   BIGINT,
    finished_at_ms  BIGINT,
    heartbeat_at_ms BIGINT,
    sleep_until_ms  BIGINT,
    output          BYTEA,
    error           TEXT
);
CREATE INDEX instances_by_status ON instances (status, sleep_until_ms);
CREATE INDEX instances_by_tenant ON instances (tenant_id, status);
CREATE INDEX instances_by_created ON instances (created_at_ms);

CREATE TABLE checkpoints (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
    checkpoint_id TEXT NOT NULL,
    state         BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (instance_id, checkpoint_id)
);

CREATE TABLE events (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
    event_type    TEXT NOT NULL,
    subtype       TEXT,
    checkpoint_id TEXT,
    payload       BYTEA,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX events_by_instance ON events (instance_id, id);

-- At most one pending cancel/pause/resume per instance: a newer one replaces the older.
CREATE TABLE signals (
    instance_id   TEXT PRIMARY KEY REFERENCES instances (instance_id) ON DELETE CASCADE,
    signal_type   TEXT NOT NULL CHECK (signal_type IN ('cancel', 'pause', 'resume')),
    payload       BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE custom_signals (
    instance_id   TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
    checkpoint_id TEXT NOT NULL,
    payload       BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (instance_id, checkpoint_id)
);
