-- A keyed task cancelled while live keeps its key's slot until its process is gone: until its
-- worker reports the attempt stopped (which clears this), or at the latest until this time (the
-- lease it held, plus the kill grace: a worker that never reports is gone, and its processes
-- with it). Counted as live by the claim (src/db/flow.ts), so a key with concurrency 1 never has
-- two live commands, not even while cancel_in_progress stops the older one. No compatible-with
-- header: an older build's claim would not count these and let a second command in.
ALTER TABLE tasks ADD COLUMN key_held_until timestamptz;

-- The holds still in force, by time: few (cancels of live keyed tasks whose stop is not yet
-- reported).
CREATE INDEX tasks_concurrency_held_idx ON tasks (key_held_until, concurrency_key) WHERE key_held_until IS NOT NULL;
