// task_log_chunks: the live logs (issue 15 part 1). Each row is one flush of a running
// attempt's output, both streams merged in the order written (src/worker/log-streamer.ts);
// readers cut the bytes they ask for out of the rows covering their offset.
import { TASK_CHANNEL_PREFIX } from "./notify";
import type { Sql } from "./sql";

export type LogStreamName = "stdout" | "stderr";
export type LogSelection = LogStreamName | "both";

/** One flush as the coordinator writes it: from which worker, for which attempt. */
export interface LogChunkRow {
  taskId: string;
  attempt: number;
  workerId: string;
  seq: number;
  offset: number;
  stdoutOffset: number;
  stderrOffset: number;
  runs: number[];
  data: Uint8Array;
  final: boolean;
  cut: number;
}

/**
 * Writes flushes in one statement, fenced: a chunk is stored only while its attempt holds its
 * task on the worker that sends it (task_attempts.outcome still null), so a stale attempt cannot
 * write into a log after its end. Bytes beyond `maxBytes` of the attempt's merged output are
 * not stored (a worker cuts them itself; this holds for any). A chunk number stored before is
 * left as it is (a re-send after a reconnect). Each task written to is notified on its own
 * channel, with kind "log" and event_id 0 (which task watchers skip), for live tails. Returns
 * how many chunks were stored.
 */
export async function insertLogChunks(sql: Sql, rows: readonly LogChunkRow[], maxBytes: number): Promise<number> {
  if (rows.length === 0) return 0;
  const input = rows.map((r) => ({
    task_id: r.taskId,
    attempt: r.attempt,
    worker_id: r.workerId,
    seq: r.seq,
    pos: r.offset,
    out_pos: r.stdoutOffset,
    err_pos: r.stderrOffset,
    runs: `{${r.runs.join(",")}}`,
    data: Buffer.from(r.data.buffer, r.data.byteOffset, r.data.byteLength).toString("base64"),
    final: r.final,
    cut: r.cut,
  }));
  const [result] = await sql<{ stored: number }[]>`
    WITH input AS (
      SELECT * FROM jsonb_to_recordset(${sql.json(input as never)}::jsonb) AS i(
        task_id uuid, attempt integer, worker_id text, seq integer, pos bigint, out_pos bigint, err_pos bigint,
        runs text, data text, final boolean, cut bigint)
    ), fenced AS (
      SELECT i.*, decode(i.data, 'base64') AS bytes
      FROM input i
      JOIN task_attempts a ON a.task_id = i.task_id AND a.attempt = i.attempt AND a.worker_id = i.worker_id
      WHERE a.outcome IS NULL AND (i.pos < ${maxBytes}::bigint OR i.final)
    ), stored AS (
      INSERT INTO task_log_chunks (task_id, attempt, seq, pos, out_pos, err_pos, runs, out_len, err_len, data, final, cut)
      SELECT task_id, attempt, seq, pos, out_pos, err_pos, runs::integer[],
             (SELECT coalesce(sum(r) FILTER (WHERE r > 0), 0) FROM unnest(runs::integer[]) r),
             (SELECT coalesce(-sum(r) FILTER (WHERE r < 0), 0) FROM unnest(runs::integer[]) r),
             substring(bytes FROM 1 FOR greatest(0, ${maxBytes}::bigint - pos)::integer), final,
             cut + greatest(0, pos + length(bytes) - ${maxBytes}::bigint)
      FROM fenced
      ON CONFLICT (task_id, attempt, seq) DO NOTHING
      RETURNING task_id
    ), notified AS (
      SELECT pg_notify(${TASK_CHANNEL_PREFIX} || t.id::text,
               json_build_object('id', t.id, 'state', t.state, 'attempt', t.attempt, 'event_id', '0', 'kind', 'log')::text)
      FROM tasks t WHERE t.id IN (SELECT task_id FROM stored)
    )
    SELECT (SELECT count(*) FROM stored)::integer AS stored, (SELECT count(*) FROM notified)::integer AS notified`;
  return result?.stored ?? 0;
}

/** Where an attempt's log stands: the attempt itself, and its task. */
export interface LogAttempt {
  taskId: string;
  /** 0: the task has had no attempt yet. */
  attempt: number;
  taskState: string;
  /** Whether the attempt has ended (its outcome is recorded). */
  ended: boolean;
  /** How it ended (task_attempts.outcome), null while it runs. */
  outcome: string | null;
  exitCode: number | null;
  /** Whether the final chunk is stored. */
  finalStored: boolean;
  /** Whether any chunk is stored. */
  anyStored: boolean;
  /** Bytes cut by the bound, as the final chunk says (0 before it). */
  cut: number;
}

/**
 * The task and one of its attempts (0: the latest, which is 0 before any). Null when the task
 * does not exist; `attempt: -1` when it exists but that attempt does not.
 */
export async function readLogAttempt(sql: Sql, taskId: string, attempt: number): Promise<LogAttempt | null> {
  const [row] = await sql<
    {
      state: string;
      attempt: number;
      found: boolean;
      outcome: string | null;
      exit_code: number | null;
      final_stored: boolean;
      any_stored: boolean;
      cut: string;
    }[]
  >`
    WITH t AS (SELECT id, state, attempt FROM tasks WHERE id = ${taskId}),
    k AS (SELECT CASE WHEN ${attempt}::integer > 0 THEN ${attempt}::integer ELSE (SELECT attempt FROM t) END AS attempt)
    SELECT t.state, k.attempt,
           (k.attempt = 0 OR a.task_id IS NOT NULL) AS found,
           a.outcome, a.exit_code,
           coalesce(last.final, false) AS final_stored,
           last.seq IS NOT NULL AS any_stored,
           coalesce(CASE WHEN last.final THEN last.cut END, 0)::text AS cut
    FROM t CROSS JOIN k
    LEFT JOIN task_attempts a ON a.task_id = t.id AND a.attempt = k.attempt
    LEFT JOIN LATERAL (
      SELECT seq, final, cut FROM task_log_chunks c
      WHERE c.task_id = t.id AND c.attempt = k.attempt ORDER BY seq DESC LIMIT 1
    ) last ON true`;
  if (!row) return null;
  return {
    taskId,
    attempt: row.found ? row.attempt : -1,
    taskState: row.state,
    ended: row.outcome !== null,
    outcome: row.outcome,
    exitCode: row.exit_code,
    finalStored: row.final_stored,
    anyStored: row.any_stored,
    cut: Number(row.cut),
  };
}

/** A run of bytes of one stream, at its offset in the selection asked for. */
export interface LogPiece {
  stream: LogStreamName;
  offset: number;
  data: Uint8Array;
  /** The chunk its last byte came from: a later read from its end may start there (`fromSeq`). */
  seq: number;
}

/**
 * The attempt's output of `selection` from `offset` on, as stored now, in the order written:
 * at most about `maxBytes` (whole pieces of the rows read, cut at maxBytes). Consecutive bytes
 * of one stream come as one piece.
 */
export async function readLogPieces(
  sql: Sql,
  taskId: string,
  attempt: number,
  selection: LogSelection,
  offset: number,
  maxBytes: number,
  fromSeq = 0,
): Promise<LogPiece[]> {
  // Only rows holding bytes of the selection past the offset: a read never comes back empty
  // while later rows hold some.
  const covers =
    selection === "stdout"
      ? sql`out_len > 0 AND out_pos + out_len > ${offset}`
      : selection === "stderr"
        ? sql`err_len > 0 AND err_pos + err_len > ${offset}`
        : sql`pos + length(data) > ${offset}`;
  const rows = await sql<{ seq: number; pos: string; out_pos: string; err_pos: string; runs: number[]; data: Uint8Array }[]>`
    SELECT seq, pos::text, out_pos::text, err_pos::text, runs, data FROM task_log_chunks
    WHERE task_id = ${taskId} AND attempt = ${attempt} AND seq >= ${fromSeq} AND ${covers} AND length(data) > 0
    ORDER BY seq
    LIMIT ${Math.max(1, Math.ceil(maxBytes / 1024))}`;
  const pieces: LogPiece[] = [];
  let total = 0;
  for (const row of rows) {
    const data = row.data;
    let at = 0;
    let out = Number(row.out_pos);
    let err = Number(row.err_pos);
    let merged = Number(row.pos);
    for (const run of row.runs) {
      if (at >= data.length) break;
      const stream: LogStreamName = run > 0 ? "stdout" : "stderr";
      const length = Math.min(Math.abs(run), data.length - at);
      const bytes = data.subarray(at, at + length);
      const start = selection === "both" ? merged : stream === "stdout" ? out : err;
      at += length;
      merged += length;
      if (stream === "stdout") out += length;
      else err += length;
      if (selection !== "both" && selection !== stream) continue;
      if (start + length <= offset) continue;
      const skip = Math.max(0, offset - start);
      let piece = bytes.subarray(skip);
      if (total + piece.length > maxBytes) piece = piece.subarray(0, maxBytes - total);
      if (piece.length === 0) continue;
      const last = pieces[pieces.length - 1];
      if (last && last.stream === stream && last.offset + last.data.length === start + skip) {
        last.data = concat(last.data, piece);
        last.seq = row.seq;
      } else pieces.push({ stream, offset: start + skip, data: piece, seq: row.seq });
      total += piece.length;
      if (total >= maxBytes) return pieces;
    }
  }
  return pieces;
}

/**
 * Deletes up to `batch` chunks written more than `retentionMs` ago, oldest first; returns how
 * many. Small batches keep each delete's locks and WAL short; the caller repeats while full.
 */
export async function pruneLogChunks(sql: Sql, retentionMs: number, batch: number): Promise<number> {
  const rows = await sql`
    DELETE FROM task_log_chunks c
    USING (
      SELECT task_id, attempt, seq FROM task_log_chunks
      WHERE written_at < now() - make_interval(secs => ${retentionMs / 1000})
      ORDER BY written_at LIMIT ${batch}
      FOR UPDATE SKIP LOCKED
    ) old
    WHERE c.task_id = old.task_id AND c.attempt = old.attempt AND c.seq = old.seq`;
  return rows.count;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const all = new Uint8Array(a.length + b.length);
  all.set(a, 0);
  all.set(b, a.length);
  return all;
}
