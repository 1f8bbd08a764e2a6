-- Worker credentials: a worker joins with a join token (TQ_WORKER_TOKEN or a TQ_WORKER_TOKENS
-- entry) and is handed its own secret in Welcome, bound to its id; it reconnects with that.
-- Only the SHA-256 is kept. One row per worker id, never deleted: a revoked id stays revoked.
CREATE TABLE worker_credentials (
  worker_id     text PRIMARY KEY,
  secret_hash   text NOT NULL,
  -- The join token (by name) it joined with; NULL when the coordinator required none.
  joined_with   text,
  created_at    timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  last_used_at  timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  revoked_at    timestamptz(3),
  revoked_by    text
);

-- The resume tokens handed out before this migration become those workers' credentials, so
-- workers running through an upgrade keep their ids. (workers.resume_hash is still written,
-- with the same hash, for coordinators of the previous release.)
INSERT INTO worker_credentials (worker_id, secret_hash)
SELECT id, resume_hash FROM workers WHERE resume_hash IS NOT NULL
ON CONFLICT DO NOTHING;
