// bun run token: manage API tokens.
//   bun run token create --name ci --scope submit,read   prints the new token, once
//   bun run token list
//   bun run token revoke --name ci
//   bun run token open-api                               lets requests in without a token
//   bun run token hash --name ci --scope submit,read     a token for TQ_API_TOKENS (no database)
//   bun run token worker-hash --name 2025-06             a join token for TQ_WORKER_TOKENS (no database)
//   bun run token worker-list [--all]                    workers' credentials (live ones; --all with revoked)
//   bun run token worker-revoke --id WORKER_ID           shuts one worker out (its coordinator closes its stream)
// Uses DATABASE_URL, or else the embedded database of `bun start` (TQ_EMBEDDED_PG_PORT).
// Data goes to stdout, messages and warnings to stderr.
import { hostname, userInfo } from "node:os";
import { parseArgs } from "node:util";
import { hashToken, newToken, parseScopes, TOKEN_NAME_PATTERN } from "../src/auth/tokens";
import { newJoinToken } from "../src/auth/worker-tokens";
import { loadConfig } from "../src/config";
import { embeddedServerUrl } from "../src/db/embedded";
import { migrateDatabase } from "../src/db/migrate";
import { connect } from "../src/db/sql";
import { type ApiAccess, apiAccess, insertToken, listTokens, openApi, revokeToken } from "../src/db/tokens";
import { listCredentials, revokeCredential } from "../src/db/worker-credentials";

const USAGE = `usage:
  bun run token create --name NAME --scope submit,read,cancel,admin
  bun run token list
  bun run token revoke --name NAME
  bun run token open-api   (once every token is revoked: requests need no token until one is created)
  bun run token hash --name NAME --scope SCOPES   (prints a TQ_API_TOKENS entry; no database)
  bun run token worker-hash --name NAME   (prints a join token and its TQ_WORKER_TOKENS entry; no database)
  bun run token worker-list [--all]   (worker credentials; --all includes revoked ones)
  bun run token worker-revoke --id WORKER_ID`;

const OPEN_HINT = "create a token (bun run token create --name NAME --scope SCOPES) or open it with: bun run token open-api";

/** One line on the state of the API, for stderr. */
function describeAccess(access: ApiAccess): string {
  if (access.live > 0) return `the API is closed: ${access.live} live token(s)`;
  if (access.closed) return `the API is closed and no token is live: every request is refused (401); ${OPEN_HINT}`;
  if (access.openedAt) return `the API is open: opened ${access.openedAt.toISOString()} by ${access.openedBy}`;
  return "the API is open: no token has been created yet";
}

function fail(message: string): never {
  console.error(`token: ${message}`);
  process.exit(2);
}

/** The token commands, for `bun run token` and `tq token` (src/cli): `args` are what follows the word token. */
export async function tokenCommand(args: readonly string[]): Promise<void> {
  const { positionals, values } = parseArgs({
    args: [...args],
    options: { name: { type: "string" }, scope: { type: "string" }, id: { type: "string" }, all: { type: "boolean" } },
    allowPositionals: true,
    strict: true,
  });
  const command = positionals[0];
  const name = values.name;
  if (command === "create" || command === "hash" || command === "revoke" || command === "worker-hash") {
    if (!name) fail(`--name is required\n${USAGE}`);
    if (!TOKEN_NAME_PATTERN.test(name))
      fail("--name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit");
  }
  if (command === "hash") {
    const scopes = parseScopes(values.scope ?? "");
    const { token } = newToken();
    console.log(`token (shown once): ${token}`);
    console.log(`TQ_API_TOKENS entry: ${name}:${scopes.join("+")}:${hashToken(token)}`);
    return;
  }
  if (command === "worker-hash") {
    const token = newJoinToken();
    console.log(`join token (shown once): ${token}`);
    console.log(`TQ_WORKER_TOKENS entry: ${name}:${hashToken(token)}`);
    console.error(
      "token: add the entry to the coordinators' TQ_WORKER_TOKENS (beside the old one), give workers the token, " +
        "then drop the old entry: workers already joined keep their own credentials",
    );
    return;
  }
  if (command === "worker-revoke" && !values.id) fail(`--id is required\n${USAGE}`);
  const commands = ["create", "list", "revoke", "open-api", "worker-list", "worker-revoke"];
  if (!commands.includes(command ?? "")) fail(USAGE);

  const config = loadConfig();
  const url = config.DATABASE_URL ?? `${embeddedServerUrl(config.TQ_EMBEDDED_PG_PORT)}/taskqueue`;
  await migrateDatabase(url);
  const sql = connect(url, { max: 1, applicationName: "task-queue token" });
  try {
    if (command === "worker-list") {
      const rows = await listCredentials(sql, { includeRevoked: values.all === true });
      if (rows.length === 0) console.log("no worker credentials");
      for (const row of rows) {
        const status = row.revoked_at ? `revoked ${row.revoked_at.toISOString()} by ${row.revoked_by}` : "live";
        console.log(
          [
            row.worker_id,
            row.name ?? "-",
            row.state ?? "-",
            `joined with ${row.joined_with ?? "no token"}`,
            `created ${row.created_at.toISOString()}`,
            `last used ${row.last_used_at.toISOString()}`,
            status,
          ].join("\t"),
        );
      }
    } else if (command === "worker-revoke") {
      const by = `${userInfo().username}@${hostname()}`;
      if (!(await revokeCredential(sql, values.id!, by))) fail(`no live credential for worker "${values.id}"`);
      console.log(
        `revoked the credential of worker "${values.id}": its coordinator closes its stream within a heartbeat and requeues its tasks`,
      );
    } else if (command === "create") {
      const scopes = parseScopes(values.scope ?? "");
      const { id, token } = newToken();
      try {
        await insertToken(sql, { id, name: name!, hash: hashToken(token), scopes });
      } catch (error) {
        if ((error as { code?: string }).code === "23505")
          fail(`a token named "${name}" exists already (names are never reused)`);
        throw error;
      }
      console.log(`created token "${name}" with scopes ${scopes.join(", ")}`);
      console.log(`token (shown once, keep it secret): ${token}`);
    } else if (command === "list") {
      const rows = await listTokens(sql);
      if (rows.length === 0) console.log("no tokens");
      for (const row of rows) {
        const status = row.revoked_at ? `revoked ${row.revoked_at.toISOString()}` : "live";
        console.log(`${row.name}\t${row.scopes.join(",")}\tcreated ${row.created_at.toISOString()}\t${status}`);
      }
      console.error(`token: ${describeAccess(await apiAccess(sql))}`);
    } else if (command === "revoke") {
      if (!(await revokeToken(sql, name!))) fail(`no live token named "${name}"`);
      console.log(`revoked token "${name}" (roles stop accepting it within a few seconds)`);
      const access = await apiAccess(sql);
      if (access.live === 0) {
        console.error(
          `token: that was the last live token; the API stays closed: every request is refused (401) until you ${OPEN_HINT}`,
        );
      }
    } else {
      const before = await apiAccess(sql);
      if (!before.closed) {
        console.error(`token: ${describeAccess(before)}; nothing to do`);
        return;
      }
      const by = `${userInfo().username}@${hostname()}`;
      const opened = await openApi(sql, by);
      if (!opened) {
        const live = (await listTokens(sql)).filter((row) => !row.revoked_at).map((row) => row.name);
        fail(`the API has live tokens (${live.join(", ")}): revoke them first; open-api only opens an API no token can enter`);
      }
      console.log(
        `opened the API at ${opened.toISOString()} (recorded, by ${by}); roles stop asking for a token within a few seconds`,
      );
      console.error(
        "token: WARNING: requests no longer need a token: whoever can reach the API can run commands. " +
          "Creating a token closes it again. Roles with TQ_API_TOKENS entries still require them, and a role " +
          "beyond loopback still needs a token or TQ_INSECURE=true.",
      );
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
}

if (import.meta.main) {
  tokenCommand(Bun.argv.slice(2)).catch((error) => fail(error instanceof Error ? error.message : String(error)));
}

/** The usage text, for `tq token --help`. */
export const TOKEN_USAGE = USAGE;

/** Runs a token command as `bun run token` does: on any failure, its message on stderr and exit 2. */
export function runTokenCommand(args: readonly string[]): Promise<void> {
  return tokenCommand(args).catch((error) => fail(error instanceof Error ? error.message : String(error)));
}
