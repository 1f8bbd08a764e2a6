// scripts/profile-summary.ts: shares come from sample counts, module loading is left out, and a
// native leaf is charged to its nearest JS caller's module.
import { expect, test } from "bun:test";
import { moduleOf, summarize } from "../../scripts/profile-summary";

const frame = (functionName: string, url: string) => ({ functionName, url, lineNumber: 0 });
const PG = "file:///w/node_modules/postgres/src/connection.js";

// root -> main (src/coordinator) -> build (postgres) -> write (native)
//      -> require (native) -> top (protobuf): startup
const profile = {
  nodes: [
    { id: 1, callFrame: frame("(root)", ""), children: [2, 5] },
    { id: 2, callFrame: frame("main", "file:///w/src/coordinator/main.ts"), children: [3] },
    { id: 3, callFrame: frame("build", PG), children: [4] },
    { id: 4, callFrame: frame("write", "") },
    { id: 5, callFrame: frame("require", ""), children: [6] },
    { id: 6, callFrame: frame("top", "file:///w/node_modules/@bufbuild/protobuf/dist/esm/index.js") },
  ],
  // Counts, not time: three ticks in write, one in build, one in main, two in module loading.
  samples: [4, 4, 4, 3, 2, 6, 6, 1],
};

test("modules are ours by src/ folder, dependencies by package (scoped too), else native or builtin", () => {
  expect(moduleOf("file:///w/src/db/claim.ts")).toBe("src/db");
  expect(moduleOf("file:///w/src/config.ts")).toBe("src");
  expect(moduleOf("file:///w/node_modules/@grpc/grpc-js/build/src/index.js")).toBe("@grpc/grpc-js");
  expect(moduleOf(PG)).toBe("postgres");
  expect(moduleOf("node:events")).toBe("builtin node:events");
  expect(moduleOf("")).toBe("native (Bun/JSC, no JS frame)");
});

test("shares are sample counts, startup and (root) left out, native leaves charged to the caller", () => {
  const s = summarize([profile]);
  expect(s.samples).toBe(5);
  expect(s.startup).toBe(2);
  expect(s.selfByModule.get("native (Bun/JSC, no JS frame)")).toBe(3);
  expect(s.selfByModule.get("postgres")).toBe(1);
  expect(s.byCallerModule.get("postgres")).toBe(4);
  expect(s.byCallerModule.get("src/coordinator")).toBe(1);
  expect(s.totalByFunction.get("main src/coordinator/main.ts:1")).toBe(5);
  expect([...s.totalByFunction.keys()].some((k) => k.startsWith("top "))).toBe(false);
});
