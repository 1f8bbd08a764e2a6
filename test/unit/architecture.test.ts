// ARCHITECTURE.md travels with the code: the README points to it, it names only places that
// exist, and every source file and folder is on its map, so a new part cannot go unmapped.
import { expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";

const ROOT = join(import.meta.dir, "../..");
const map = readFileSync(join(ROOT, "ARCHITECTURE.md"), "utf8");
const readme = readFileSync(join(ROOT, "README.md"), "utf8");

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [relative(ROOT, path)];
  });
}

test("the README points to ARCHITECTURE.md, not to a design kept elsewhere", () => {
  expect(readme).toContain("(ARCHITECTURE.md)");
  expect(readme).not.toContain("DESIGN.md");
});

test("every path ARCHITECTURE.md names exists", () => {
  const named = [...map.matchAll(/\b(?:src|test|bench|scripts|proto)\/[A-Za-z0-9_./-]+/g)].map((m) =>
    m[0].replace(/[.,:)]+$/, ""),
  );
  expect(named.length).toBeGreaterThan(20);
  for (const path of named) expect(existsSync(join(ROOT, path)), path).toBe(true);
});

test("every source file outside generated code and migrations is on the map", () => {
  const unmapped = files(join(ROOT, "src"))
    .filter((path) => !path.startsWith("src/gen/") && !path.startsWith("src/db/migrations/"))
    .filter((path) => !map.includes(path) && !map.includes(`\`${path.split("/").pop()}\``));
  expect(unmapped).toEqual([]);
});

test("every folder under src/ has its own section", () => {
  const folders = readdirSync(join(ROOT, "src")).filter((name) => statSync(join(ROOT, "src", name)).isDirectory());
  const unmapped = folders.filter((folder) => !map.includes(folder === "gen" ? "`src/gen/`" : `### \`src/${folder}/\``));
  expect(unmapped).toEqual([]);
});
