// .ci/run is what CI runs on a clean clone: it must lint before testing, and run the README's
// test command both on the machine's PostgreSQL and exactly as a newcomer does.
import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import pkg from "../../package.json";

const ROOT = join(import.meta.dir, "../..");
const ci = readFileSync(join(ROOT, ".ci/run"), "utf8");
const lines = ci.split("\n").filter((line) => !line.trimStart().startsWith("#"));
const lineOf = (pattern: RegExp) => lines.findIndex((line) => pattern.test(line));

test("bun run lint is Biome over the repository, and the tree passes it", () => {
  expect(pkg.scripts.lint).toBe("biome check .");
  const run = Bun.spawnSync(["bun", "run", "lint"], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  expect(run.exitCode, run.stderr.toString()).toBe(0);
});

test(".ci/run type-checks and lints before it runs the tests", () => {
  const lint = lineOf(/^bun run lint$/);
  const typecheck = lineOf(/^bun run typecheck$/);
  const tests = lineOf(/bun install && bun test/);
  expect(lint).toBeGreaterThan(-1);
  expect(typecheck).toBeGreaterThan(-1);
  expect(tests).toBeGreaterThan(lint);
  expect(tests).toBeGreaterThan(typecheck);
});

test(".ci/run runs the README's test command once more with no database configured", () => {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  expect(readme).toContain("bun install && bun test");
  expect(lines.some((line) => /run_tests .*-u DATABASE_URL -u TEST_DATABASE_URL/.test(line))).toBe(true);
  expect(lines.some((line) => /run_tests .*DATABASE_URL="\$DATABASE_URL"/.test(line))).toBe(true);
});
