// The README is a contract: its configuration table must match the configuration schema, and
// the commands it names must exist.
import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import pkg from "../../package.json";
import { ConfigSchema } from "../../src/config";

const ROOT = join(import.meta.dir, "../..");
const readme = readFileSync(join(ROOT, "README.md"), "utf8");

function configTable(): Map<string, string> {
  const section = readme.slice(readme.indexOf("## Configuration"), readme.indexOf("## Guarantees"));
  const rows = new Map<string, string>();
  for (const line of section.split("\n")) {
    const match = /^\| `([A-Z_]+)` \| (.+?) \| .+ \|$/.exec(line);
    if (match) rows.set(match[1]!, match[2]!);
  }
  return rows;
}

test("the configuration table lists every variable of the schema, and only those", () => {
  expect([...configTable().keys()].sort()).toEqual(Object.keys(ConfigSchema.properties).sort());
});

test("each default in the configuration table is the schema's default", () => {
  const table = configTable();
  for (const [key, schema] of Object.entries(ConfigSchema.properties)) {
    const fallback = (schema as { default?: unknown }).default;
    const shown = table.get(key)!;
    if (fallback === undefined) expect(shown, key).not.toMatch(/^`[^<]/);
    else expect(shown, key).toBe(`\`${String(fallback)}\``);
  }
});

test("every `bun run <script>` in the README is a package.json script", () => {
  const scripts = new Set(Object.keys(pkg.scripts));
  const named = [...readme.matchAll(/bun run ([a-z][a-z-]*)/g)].map((m) => m[1]!);
  expect(named.length).toBeGreaterThan(0);
  for (const name of named) expect(scripts.has(name), name).toBe(true);
});

test("the README gives the two set-up commands", () => {
  expect(readme).toContain("bun install && bun start");
  expect(readme).toContain("bun install && bun test");
});
