-- Runs and ownership: each registration begins a run; an instance's newest run owns it.
ALTER TABLE instances ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
-- What to run: the workflow name chooses the launch command; the input is the operator's.
ALTER TABLE instances ADD COLUMN workflow TEXT NOT NULL DEFAULT 'default';
ALTER TABLE instances ADD COLUMN input BYTEA;
-- Recovery: relaunches of orphaned runs in a row without a new checkpoint, when the current run was
-- found dead, and the backoff before the next launch.
ALTER TABLE instances ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN orphaned_at_ms BIGINT;
ALTER TABLE instances ADD COLUMN launch_after_ms BIGINT;
-- The in-process worker whose launch began the current run, so that a worker starting again knows its
-- runs died with it.
ALTER TABLE instances ADD COLUMN executor TEXT;
CREATE INDEX instances_by_created_status ON instances (status, created_at_ms);
