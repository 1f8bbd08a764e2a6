// Loaded before every test file (bunfig.toml). Tracks the timers and processes each file
// creates and fails a file that leaves any behind (leaks.ts), and stops the embedded
// PostgreSQL cluster, if the run started one, once all files are done.
import { afterAll, beforeEach, setDefaultTimeout } from "bun:test";
import { HOOK_TIMEOUT_MS, stopEmbeddedServer, TEST_TIMEOUT_MS } from "./db";
import { checkLastFile, checkPreviousFile, installLeakTracking } from "./leaks";

installLeakTracking();

// End-to-end tests start processes and PostgreSQL; they wait on signals, with this ceiling.
setDefaultTimeout(TEST_TIMEOUT_MS);

beforeEach(checkPreviousFile, HOOK_TIMEOUT_MS);

afterAll(async () => {
  try {
    await checkLastFile();
  } finally {
    await stopEmbeddedServer();
  }
}, 30_000);
