-- Live logs (issue 15 part 1): what a task's command writes to stdout and stderr, stored as it
-- runs, in numbered chunks per attempt (src/db/logs.ts). A chunk is one flush of the worker's
-- adaptive buffer (src/worker/log-streamer.ts): both streams' bytes in the order written, with
-- the runs saying which bytes came from which stream, so a chatty task writes a row per flush,
-- never a row per line, and a task that writes nothing writes no row at all.
CREATE TABLE task_log_chunks (
  task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
  attempt    integer NOT NULL CHECK (attempt >= 1),
  -- 0, 1, 2, ... per attempt: the worker's flush number; a re-sent chunk is the same row.
  seq        integer NOT NULL CHECK (seq >= 0),
  -- Offset of data's first byte in the attempt's output with both streams merged in the order
  -- written, and in stdout and stderr alone.
  pos        bigint NOT NULL CHECK (pos >= 0),
  out_pos    bigint NOT NULL CHECK (out_pos >= 0),
  err_pos    bigint NOT NULL CHECK (err_pos >= 0),
  -- Lengths of data's runs in order: positive from stdout, negative from stderr; and their sums
  -- per stream, so that a read of one stream finds its rows by offset.
  runs       integer[] NOT NULL,
  out_len    integer NOT NULL CHECK (out_len >= 0),
  err_len    integer NOT NULL CHECK (err_len >= 0),
  data       bytea NOT NULL,
  -- The attempt's last chunk: everything it wrote is at or before it.
  final      boolean NOT NULL DEFAULT false,
  -- On the final chunk: bytes the command wrote past TQ_LOG_MAX_BYTES, which were not kept.
  cut        bigint NOT NULL DEFAULT 0 CHECK (cut >= 0),
  written_at timestamptz(3) NOT NULL DEFAULT now(),
  PRIMARY KEY (task_id, attempt, seq)
);

-- TQ_LOG_RETENTION prunes the oldest chunks first, in small batches.
CREATE INDEX task_log_chunks_written_at ON task_log_chunks (written_at);
