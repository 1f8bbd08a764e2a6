// The README's commands, as printed, for the tests that run them.
import { expect } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const ROOT = join(import.meta.dir, "../..");

/** The curl commands of one README section, in order. */
export function readmeCurls(section: string): string[] {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const from = readme.indexOf(`### ${section}`);
  expect(from).toBeGreaterThanOrEqual(0);
  const end = readme.indexOf("\n### ", from + 1);
  return readme
    .slice(from, end < 0 ? undefined : end)
    .split("\n")
    .filter((line) => line.startsWith("curl "));
}

/** Runs a README command as printed, pointed at a test's ports; returns its output. */
export async function runReadmeCommand(command: string, ports: { scheduler: number; coordinator: number }): Promise<string> {
  const local = command
    .replaceAll("localhost:8081", `localhost:${ports.scheduler}`)
    .replaceAll("localhost:8080", `localhost:${ports.coordinator}`);
  const proc = Bun.spawn(["sh", "-c", `${local} --silent --show-error --max-time 10`], { stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  expect(err).toBe("");
  expect(code).toBe(0);
  return out;
}
