// The start gate (src/worker/start-gate.ts) through the executor: one write releases as many
// armed shells as it carries newlines, whatever order they read in; a shell the gate never
// released exits without running its command when the gate closes. Host gates: one FIFO per
// instant shared by the workers of a host, the first opening recorded for the others, and a
// shell whose worker died running nothing.
import { expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Execution, execute, HOST_GATED_SCRIPT } from "../../src/worker/executor";
import { HostGates, StartGate } from "../../src/worker/start-gate";
import { eventually } from "../support/eventually";

function armedOn(gate: StartGate, command: string, hostGate = false): Execution {
  return execute({
    command,
    env: {},
    timeoutMs: 0,
    killGraceMs: 1000,
    maxOutputBytes: 1000,
    baseEnv: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    armed: true,
    gate: gate.readFd,
    hostGate,
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

test("host gates: one instant's FIFO is shared, the first opening lets every worker's shells go and is recorded for the others", async () => {
  const dir = mkdtempSync(join(tmpdir(), "host-gate-"));
  try {
    const gates = HostGates.open(join(dir, "gates"));
    if (typeof gates === "string") throw new Error(`no host gates here: ${gates}`);
    const instant = Date.now() - 10;
    // Two workers' gates of one instant, and one of another instant.
    const first = gates.gate(instant);
    const second = gates.gate(instant);
    const other = gates.gate(instant + 1000);
    if (!first || !second || !other) throw new Error("a host gate could not be made");
    expect(first.isHost && second.isHost).toBe(true);
    const shells = [first, first, second, second, other].map((gate, i) =>
      armedOn(gate, `echo ran > '${join(dir, `r${i}`)}'`, true),
    );
    for (const gate of [first, first, second, second, other]) gate.add();
    const openedAt = (gate: StartGate) => {
      const opening = gate.enter();
      if (!opening) throw new Error("a host gate's lock could not be had");
      opening.leave();
      return opening.openedAt;
    };
    expect(openedAt(second)).toBeNull();
    const at = Date.now();
    const opening = first.enter();
    if (!opening) throw new Error("a host gate's lock could not be had");
    expect(opening.openedAt).toBeNull();
    opening.open(at);
    opening.leave();
    // The second worker's shells went with the first one's write, and it can tell when.
    const results = await Promise.all(shells.slice(0, 4).map((execution) => execution.result));
    expect(results.map((result) => result.exitCode)).toEqual([0, 0, 0, 0]);
    for (let i = 0; i < 4; i++) expect(existsSync(join(dir, `r${i}`))).toBe(true);
    expect(openedAt(second)).toBe(at);
    expect(openedAt(first)).toBe(at);
    // Another instant's gate is not opened by it; given up, it is given up for every worker,
    // and its shell there is not let go by it.
    expect(existsSync(join(dir, "r4"))).toBe(false);
    const late = other.enter();
    if (!late) throw new Error("a host gate's lock could not be had");
    expect(late.openedAt).toBeNull();
    late.giveUp();
    late.leave();
    const after = other.enter();
    expect(after?.givenUp).toBe(true);
    after?.leave();
    expect(existsSync(join(dir, "r4"))).toBe(false);
    shells[4]!.kill();
    expect((await shells[4]!.result).exitCode).toBeNull();
    expect(existsSync(join(dir, "r4"))).toBe(false);
    for (const gate of [first, second, other]) gate.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a shell on a host gate whose worker died runs nothing when another worker opens the gate", async () => {
  const dir = mkdtempSync(join(tmpdir(), "host-gate-orphan-"));
  try {
    const gates = HostGates.open(join(dir, "gates"));
    if (typeof gates === "string") throw new Error(`no host gates here: ${gates}`);
    const gate = gates.gate(Date.now());
    if (!gate) throw new Error("a host gate could not be made");
    // A stand-in worker: an sh that spawns the gated shell (fd 3 the gate, $1 its own pid, as
    // the executor passes the worker's) and then exits ("dies"), or stays (lives) until its
    // child is done.
    const spawnVia = (marker: string, dies: boolean) =>
      Bun.spawn(
        [
          "sh",
          "-c",
          dies ? 'sh -c "$S" sh $$ sh -c "echo ran > $M" & echo $!' : 'sh -c "$S" sh $$ sh -c "echo ran > $M" & echo $!; wait',
        ],
        {
          env: { PATH: process.env.PATH ?? "/usr/bin:/bin", S: HOST_GATED_SCRIPT, M: join(dir, marker) },
          stdio: ["ignore", "pipe", "ignore", gate.readFd],
        },
      );
    const orphanParent = spawnVia("orphan", true);
    const livingParent = spawnVia("living", false);
    const pidOf = async (proc: typeof orphanParent) => {
      const reader = proc.stdout.getReader();
      let text = "";
      while (!text.includes("\n")) {
        const { value, done } = await reader.read();
        if (done) break;
        text += new TextDecoder().decode(value);
      }
      reader.releaseLock();
      return Number(text.trim());
    };
    const orphan = await pidOf(orphanParent);
    const living = await pidOf(livingParent);
    expect(await orphanParent.exited).toBe(0);
    gate.add();
    gate.open();
    expect(await livingParent.exited).toBe(0);
    await eventually(() => (existsSync(`/proc/${orphan}`) ? null : true), { what: "the orphaned shell's exit" });
    expect(existsSync(`/proc/${living}`)).toBe(false);
    expect(existsSync(join(dir, "living"))).toBe(true);
    expect(existsSync(join(dir, "orphan"))).toBe(false);
    gate.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("host gates' folder: made 0700, its mode narrowed, refused when not a folder or not ours; long-past instants swept", () => {
  const dir = mkdtempSync(join(tmpdir(), "host-gate-dir-"));
  try {
    const path = join(dir, "gates");
    const gates = HostGates.open(path);
    if (typeof gates === "string") throw new Error(`no host gates here: ${gates}`);
    expect(statSync(path).mode & 0o777).toBe(0o700);
    chmodSync(path, 0o755);
    expect(typeof HostGates.open(path)).not.toBe("string");
    expect(statSync(path).mode & 0o777).toBe(0o700);
    writeFileSync(join(dir, "file"), "");
    expect(HostGates.open(join(dir, "file"))).toContain("EEXIST");
    symlinkSync(path, join(dir, "link"));
    expect(HostGates.open(join(dir, "link"))).toContain("is not a folder");
    if (process.getuid?.() === 0) {
      mkdirSync(join(dir, "theirs"));
      chownSync(join(dir, "theirs"), 65534, 65534);
      expect(HostGates.open(join(dir, "theirs"))).toContain("belongs to uid 65534");
    }
    // A dead worker's leftovers of an instant two minutes ago go; a recent instant's stay.
    const now = Date.now();
    writeFileSync(join(path, `${now - 120_000}`), "");
    writeFileSync(join(path, `${now - 120_000}.opened`), `${now - 120_000}\n`);
    writeFileSync(join(path, `${now - 1_000}.opened`), `${now - 1_000}\n`);
    const fresh = HostGates.open(path);
    if (typeof fresh === "string") throw new Error(fresh);
    fresh.gate(now, now)?.close();
    expect(readdirSync(path).sort()).toEqual([`${now - 1_000}.opened`, `${now}`].sort());
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
