// Embedded PostgreSQL's lifecycle: a start that cannot succeed fails at once with
// PostgreSQL's own words; a started cluster runs apart from the role's signals, stops for real
// and finds its data again on restart.
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { startEmbedded } from "../../src/db/embedded";
import { freePort } from "../support/db";

const dirs: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "tq-embedded-"));
  dirs.push(dir);
  return dir;
}

afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function processGroup(pid: number): number {
  const out = Bun.spawnSync(["ps", "-o", "pgid=", "-p", String(pid)])
    .stdout.toString()
    .trim();
  return Number.parseInt(out, 10);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

test("a taken port fails the start at once, with the server's own reason", async () => {
  const taken = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  try {
    const started = performance.now();
    const error = await startEmbedded({ dataDir: tempDir(), port: taken.port }).then(
      () => null,
      (e: Error) => e,
    );
    expect(error?.message).toContain(`did not start on 127.0.0.1:${taken.port}`);
    expect(error?.message).toContain("Address already in use");
    // initdb and a refused bind, not a timeout.
    expect(performance.now() - started).toBeLessThan(30_000);
  } finally {
    taken.stop(true);
  }
});

test("initdb's refusal is the error", async () => {
  const dir = tempDir();
  writeFileSync(join(dir, "stray"), "not a cluster");
  const error = await startEmbedded({ dataDir: dir, port: await freePort() }).then(
    () => null,
    (e: Error) => e,
  );
  expect(error?.message).toContain("initdb failed");
  expect(error?.message).toContain("exists but is not empty");
});

test("the server runs in its own process group, stops for real and keeps its data across a restart", async () => {
  const dataDir = tempDir();
  const port = await freePort();
  const db = await startEmbedded({ dataDir, port, settings: { fsync: "off" } });
  try {
    expect(db.dataDir).toBe(dataDir);
    const pid = Number.parseInt(readFileSync(join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]!, 10);
    // A Ctrl+C or systemd's stop reaches the role's group, not the database under its drain.
    expect(processGroup(pid)).toBe(pid);
    expect(processGroup(pid)).not.toBe(processGroup(process.pid));
    const sql = postgres(db.url, { max: 1, onnotice: () => {} });
    await sql`CREATE TABLE kept (note text)`;
    await sql`INSERT INTO kept VALUES ('before the restart')`;
    await sql.end();

    await db.stop();
    expect(alive(pid)).toBe(false);

    await db.restart();
    const again = postgres(db.url, { max: 1, onnotice: () => {} });
    try {
      expect([...(await again`SELECT note FROM kept`)]).toEqual([{ note: "before the restart" }]);
      const [{ encoding } = { encoding: "" }] = await again<{ encoding: string }[]>`
        SELECT pg_encoding_to_char(encoding) AS encoding FROM pg_database WHERE datname = current_database()`;
      expect(encoding).toBe("UTF8");
    } finally {
      await again.end();
    }
  } finally {
    await db.stop();
  }
});
