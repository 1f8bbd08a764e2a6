// Where a role's CPU goes, from the .cpuprofile files Bun's --cpu-prof writes (TQ_BENCH_CPU_PROF,
// test/support/processes.ts). Shares are taken from sample COUNTS, not from the time deltas or
// the --cpu-prof-md self times: Bun samples only while the thread runs, and the delta after an
// idle stretch is charged to the last sampled function (an 896 ms delta on `emit` in one run),
// so time-weighted self times measure idleness. A count is one sampling tick of running code.
//
//   bun scripts/profile-summary.ts <dir> [--top N] [--cpu role=ms,...]
//
// Files are grouped by role (the name before the first `-`, e.g. coordinator-<ms>.cpuprofile).
// --cpu coordinator=0.745,worker=0.873 turns each share into ms per task (from bench cost).
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
}

/** The module a frame belongs to: ours by src/ folder, a dependency by package, else native. */
export function moduleOf(url: string): string {
  if (url === "") return "native (Bun/JSC, no JS frame)";
  if (url.startsWith("node:") || url.startsWith("bun:")) return `builtin ${url}`;
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(url);
  if (pkg) return pkg[1]!;
  const ours = /\/(src|bench|test|scripts)\/(?:([^/]+)\/)?/.exec(url);
  if (ours) return ours[2] && !ours[2].includes(".") ? `${ours[1]}/${ours[2]}` : ours[1]!;
  return url;
}

function frameName(f: CallFrame): string {
  const file = f.url.replace(/^file:\/\/.*?\/(node_modules|src|bench|test|scripts)\//, "$1/");
  return `${f.functionName || "(anonymous)"} ${file ? `${file}:${f.lineNumber + 1}` : "(native)"}`;
}

/** Frames of module loading: a role's startup, not its per-task work. */
const STARTUP = new Set(["require", "bound require", "moduleEvaluation", "asyncModuleEvaluation", "loadAndEvaluateModule"]);

export interface Summary {
  /** Samples outside startup: the base of every share. */
  samples: number;
  /** Samples with a module-loading frame on the stack, left out of the shares. */
  startup: number;
  /** Leaf samples per function and per module (what ran). */
  selfByFunction: Map<string, number>;
  selfByModule: Map<string, number>;
  /** As selfByModule, with a native leaf charged to its nearest JS caller's module. */
  byCallerModule: Map<string, number>;
  /** Samples with the function anywhere on the stack, each sample counted once per function. */
  totalByFunction: Map<string, number>;
}

export function summarize(profiles: Profile[]): Summary {
  const s: Summary = {
    samples: 0,
    startup: 0,
    selfByFunction: new Map(),
    selfByModule: new Map(),
    byCallerModule: new Map(),
    totalByFunction: new Map(),
  };
  const add = (m: Map<string, number>, k: string, n: number) => m.set(k, (m.get(k) ?? 0) + n);
  for (const p of profiles) {
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    const parent = new Map<number, number>();
    for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
    const hits = new Map<number, number>();
    for (const id of p.samples) hits.set(id, (hits.get(id) ?? 0) + 1);
    for (const [id, n] of hits) {
      const leaf = byId.get(id)!;
      if (leaf.callFrame.functionName === "(root)" || leaf.callFrame.functionName === "(idle)") continue;
      let loading = false;
      for (let cur: number | undefined = id; cur !== undefined && !loading; cur = parent.get(cur))
        loading = STARTUP.has(byId.get(cur)!.callFrame.functionName);
      if (loading) {
        s.startup += n;
        continue;
      }
      s.samples += n;
      add(s.selfByFunction, frameName(leaf.callFrame), n);
      add(s.selfByModule, moduleOf(leaf.callFrame.url), n);
      let caller: number | undefined = id;
      while (caller !== undefined && byId.get(caller)!.callFrame.url === "") caller = parent.get(caller);
      const callerUrl = caller === undefined ? "" : byId.get(caller)!.callFrame.url;
      add(s.byCallerModule, callerUrl === "" ? moduleOf("") : moduleOf(callerUrl), n);
      const seen = new Set<string>();
      for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
        const f = byId.get(cur)!.callFrame;
        if (f.functionName === "(root)") break;
        const name = frameName(f);
        if (!seen.has(name)) {
          seen.add(name);
          add(s.totalByFunction, name, n);
        }
      }
    }
  }
  return s;
}

function table(title: string, m: Map<string, number>, total: number, top: number, cpuMs?: number) {
  console.log(`\n${title}`);
  const rows = [...m].sort((a, b) => b[1] - a[1]).slice(0, top);
  for (const [k, n] of rows) {
    const share = n / total;
    const ms = cpuMs === undefined ? "" : `  ${(share * cpuMs).toFixed(3)} ms/task`;
    console.log(`  ${(share * 100).toFixed(1).padStart(5)}%  ${String(n).padStart(6)}${ms}  ${k}`);
  }
}

if (import.meta.main) {
  const args = process.argv.slice(2);
  const dir = args.find((a) => !a.startsWith("--"));
  if (!dir) {
    console.error("usage: bun scripts/profile-summary.ts <dir> [--top N] [--cpu role=ms,...]");
    process.exit(2);
  }
  const flag = (name: string) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const top = Number(flag("--top") ?? 15);
  const cpu = new Map(
    (flag("--cpu") ?? "")
      .split(",")
      .filter(Boolean)
      .map((kv) => {
        const [k, v] = kv.split("=");
        return [k!, Number(v)] as const;
      }),
  );
  const byRole = new Map<string, Profile[]>();
  for (const f of readdirSync(dir)
    .filter((f) => f.endsWith(".cpuprofile"))
    .sort()) {
    const role = f.split("-")[0]!;
    const list = byRole.get(role) ?? [];
    list.push(JSON.parse(readFileSync(join(dir, f), "utf8")) as Profile);
    byRole.set(role, list);
  }
  for (const [role, profiles] of byRole) {
    const s = summarize(profiles);
    const ms = cpu.get(role);
    console.log(
      `\n== ${role}: ${profiles.length} profile(s), ${s.samples} samples (${s.startup} more in module loading, left out)${ms ? `, ${ms} ms CPU per task` : ""}`,
    );
    table("by module (self)", s.selfByModule, s.samples, top, ms);
    table("by module, native leaves charged to their JS caller", s.byCallerModule, s.samples, top, ms);
    table("by function (self)", s.selfByFunction, s.samples, top, ms);
    table("by function (on the stack)", s.totalByFunction, s.samples, top, ms);
  }
}
