// bun run token: manage API tokens.
//   bun run token create --name ci --scope submit,read   prints the new token, once
//   bun run token list
//   bun run token revoke --name ci
//   bun run token hash --name ci --scope submit,read     a token for TQ_API_TOKENS (no database)
// Uses DATABASE_URL, or else the embedded database of `bun start` (TQ_EMBEDDED_PG_PORT).
import { parseArgs } from "node:util";
import { hashToken, newToken, parseScopes, TOKEN_NAME_PATTERN } from "../src/auth/tokens";
import { loadConfig } from "../src/config";
import { embeddedServerUrl } from "../src/db/embedded";
import { migrateDatabase } from "../src/db/migrate";
import { connect } from "../src/db/sql";
import { insertToken, listTokens, revokeToken } from "../src/db/tokens";

const USAGE = `usage:
  bun run token create --name NAME --scope submit,read,cancel,admin
  bun run token list
  bun run token revoke --name NAME
  bun run token hash --name NAME --scope SCOPES   (prints a TQ_API_TOKENS entry; no database)`;

function fail(message: string): never {
  console.error(`token: ${message}`);
  process.exit(2);
}

async function main(): Promise<void> {
  const { positionals, values } = parseArgs({
    args: Bun.argv.slice(2),
    options: { name: { type: "string" }, scope: { type: "string" } },
    allowPositionals: true,
    strict: true,
  });
  const command = positionals[0];
  const name = values.name;
  if (command === "create" || command === "hash" || command === "revoke") {
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
  if (command !== "create" && command !== "list" && command !== "revoke") fail(USAGE);

  const config = loadConfig();
  const url = config.DATABASE_URL ?? `${embeddedServerUrl(config.TQ_EMBEDDED_PG_PORT)}/taskqueue`;
  await migrateDatabase(url);
  const sql = connect(url, { max: 1, applicationName: "task-queue token" });
  try {
    if (command === "create") {
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
    } else {
      if (!(await revokeToken(sql, name!))) fail(`no live token named "${name}"`);
      console.log(`revoked token "${name}" (roles stop accepting it within a few seconds)`);
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
}

main().catch((error) => fail(error instanceof Error ? error.message : String(error)));
