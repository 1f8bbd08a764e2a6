// Loaded before every test file (bunfig.toml). Stops the embedded PostgreSQL cluster, if the
// run started one, once all files are done.
import { afterAll } from "bun:test";
import { stopEmbeddedServer } from "./db";

afterAll(async () => {
  await stopEmbeddedServer();
});
