-- compatible-with: 6
-- Each task's attempts hold a lease of their own: lease_ms, the milliseconds a renewal grants.
-- NULL (every task from before this migration, and those that ask for none): the
-- TQ_DEFAULT_LEASE_MS of the coordinator that grants or renews it. Older builds neither write
-- nor read it and grant their own lease (the heartbeat timeout plus an interval), which is
-- shorter: during a rolling upgrade a task's lease may be the shorter one, never unsafe.
ALTER TABLE tasks ADD COLUMN lease_ms integer CHECK (lease_ms > 0);
