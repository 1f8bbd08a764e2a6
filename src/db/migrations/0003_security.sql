-- Security: API tokens, who did what, worker identity, secret task environment.

-- A token is "tq_<id>_<secret>"; only its SHA-256 is kept. The id finds the row, the hash is
-- compared in constant time.
CREATE TABLE api_tokens (
  id          text PRIMARY KEY,
  name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
  token_hash  text NOT NULL,
  scopes      text[] NOT NULL CHECK (scopes <@ ARRAY['submit', 'read', 'cancel', 'admin']::text[] AND cardinality(scopes) > 0),
  created_at  timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  revoked_at  timestamptz(3)
);

-- The token (by name) that submitted or cancelled a task.
ALTER TABLE task_events ADD COLUMN actor text;

-- Proof that a reconnecting worker is the one that first took its id: the coordinator hands
-- out a resume token in Welcome and keeps its hash.
ALTER TABLE workers ADD COLUMN resume_hash text;

-- Environment values passed to the task's process but never returned by any API.
ALTER TABLE tasks ADD COLUMN secret_env jsonb NOT NULL DEFAULT '{}'::jsonb;
