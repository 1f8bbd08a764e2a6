// The committed code in src/gen must be what `bun run gen` produces from proto/.
import { expect, setDefaultTimeout, test } from "bun:test";
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

const ROOT = join(import.meta.dir, "../..");

// Each test runs a generator as a process (buf, or the bundled openapi-typescript): seconds on a
// loaded machine, more than the runner's 5 s default.
setDefaultTimeout(60_000);

function files(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string) => {
    for (const entry of readdirSync(d, { withFileTypes: true })) {
      const path = join(d, entry.name);
      if (entry.isDirectory()) walk(path);
      else out.set(relative(dir, path), readFileSync(path, "utf8"));
    }
  };
  walk(dir);
  return out;
}

test("src/gen is up to date with proto/ (run `bun run gen` and commit)", () => {
  const scratch = mkdtempSync(join(tmpdir(), "tq-gen-"));
  try {
    cpSync(join(ROOT, "proto"), join(scratch, "proto"), { recursive: true });
    symlinkSync(join(ROOT, "node_modules"), join(scratch, "node_modules"));
    const buf = join(ROOT, "node_modules/.bin/buf");
    const result = Bun.spawnSync([buf, "generate"], { cwd: join(scratch, "proto"), stderr: "pipe" });
    expect(result.stderr.toString()).toBe("");
    expect(result.exitCode).toBe(0);
    const fresh = files(join(scratch, "src/gen"));
    const committed = files(join(ROOT, "src/gen"));
    expect([...committed.keys()].sort()).toEqual([...fresh.keys()].sort());
    for (const [path, text] of fresh) expect(committed.get(path), path).toBe(text);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
});

test("proto/ passes buf lint", () => {
  const result = Bun.spawnSync([join(ROOT, "node_modules/.bin/buf"), "lint"], { cwd: join(ROOT, "proto"), stdout: "pipe" });
  expect(result.stdout.toString()).toBe("");
  expect(result.exitCode).toBe(0);
});

test("src/client is up to date with the OpenAPI document the roles serve (run `bun run gen` and commit)", () => {
  const scratch = mkdtempSync(join(tmpdir(), "tq-gen-client-"));
  try {
    const result = Bun.spawnSync(["bun", join(ROOT, "scripts/gen-client.ts"), scratch], { cwd: ROOT, stderr: "pipe" });
    expect(result.stderr.toString()).toContain("wrote openapi.json and schema.ts");
    expect(result.exitCode).toBe(0);
    for (const name of ["openapi.json", "schema.ts"]) {
      const fresh = readFileSync(join(scratch, name), "utf8");
      expect(fresh.length).toBeGreaterThan(1000);
      expect(readFileSync(join(ROOT, "src/client", name), "utf8"), `src/client/${name}`).toBe(fresh);
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
});
