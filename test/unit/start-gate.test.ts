// The start gate (src/worker/start-gate.ts) through the executor: one write releases as many
// armed shells as it carries newlines, whatever order they read in; a shell the gate never
// released exits without running its command when the gate closes.
import { expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Execution, execute } from "../../src/worker/executor";
import { StartGate } from "../../src/worker/start-gate";

function armedOn(gate: StartGate, command: string): Execution {
  return execute({
    command,
    env: {},
    timeoutMs: 0,
    killGraceMs: 1000,
    maxOutputBytes: 1000,
    baseEnv: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    armed: true,
    gate: gate.readFd,
  });
}

test("one gate write releases every shell on it, each once, whatever order they read in", async () => {
  const dir = mkdtempSync(join(tmpdir(), "start-gate-"));
  try {
    const gate = StartGate.create();
    if (!gate) throw new Error("no start gate on this Linux host: pipe2 through bun:ffi failed");
    const shells = Array.from({ length: 40 }, (_, i) => armedOn(gate, `echo ran > '${join(dir, `r${i}`)}'`));
    for (const execution of shells) {
      gate.add();
      expect(execution.release()).toBe(true);
    }
    expect(gate.open()).toBe(40);
    // Written for already: a second open writes nothing.
    expect(gate.open()).toBe(0);
    const results = await Promise.all(shells.map((execution) => execution.result));
    expect(results.filter((result) => result.outcome === "exited" && result.exitCode === 0).length).toBe(40);
    for (let i = 0; i < 40; i++) expect(existsSync(join(dir, `r${i}`))).toBe(true);
    gate.close();
    expect(gate.isClosed).toBe(true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a shell never let go runs nothing when its gate closes", async () => {
  const dir = mkdtempSync(join(tmpdir(), "start-gate-"));
  try {
    const gate = StartGate.create();
    if (!gate) throw new Error("no start gate on this Linux host: pipe2 through bun:ffi failed");
    const shells = Array.from({ length: 3 }, (_, i) => armedOn(gate, `echo ran > '${join(dir, `h${i}`)}'`));
    gate.close();
    const results = await Promise.all(shells.map((execution) => execution.result));
    expect(results.map((result) => result.exitCode)).toEqual([0, 0, 0]);
    for (let i = 0; i < 3; i++) expect(existsSync(join(dir, `h${i}`))).toBe(false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
