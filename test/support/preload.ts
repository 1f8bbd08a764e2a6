// Loaded before every test file (bunfig.toml). Stops the embedded PostgreSQL cluster, if the
// run started one, once all files are done.
import { afterAll, setDefaultTimeout } from "bun:test";
import { stopEmbeddedServer, TEST_TIMEOUT_MS } from "./db";

// End-to-end tests start processes and PostgreSQL; they wait on signals, with this ceiling.
setDefaultTimeout(TEST_TIMEOUT_MS);

afterAll(async () => {
  await stopEmbeddedServer();
}, 30_000);
