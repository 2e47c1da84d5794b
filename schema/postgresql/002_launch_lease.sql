-- The wake scheduler's claim on a due instance: not launched again before the lease ends.
ALTER TABLE instances ADD COLUMN launch_lease_until_ms BIGINT;
ALTER TABLE instances ADD COLUMN launch_attempts INTEGER NOT NULL DEFAULT 0;
