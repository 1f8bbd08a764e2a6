// A temporary folder a test's tasks can use: a worker started as root runs them as its slots'
// own users (src/worker/identity.ts), who cannot enter a folder mkdtemp made (mode 0700).
// Sticky and open to all, as /tmp is: tasks of different users can meet in it.
import { chmodSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function taskDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(dir, 0o1777);
  return dir;
}
