#!/usr/bin/env bun
// tq: the command line of task-queue (`bun run tq <verb>`, or `tq` once linked: package.json's
// bin). Finds the verb, parses its flags with node:util parseArgs, runs it (src/cli/verbs.ts)
// and exits with its code (src/cli/context.ts EXIT; README, "CLI"). The URL and token come from
// --url/--token, else TQ_URL/TQ_TOKEN: the CLI's only settings, read here.
import { parseArgs } from "node:util";
import { CliError, DEFAULT_URL, EXIT, makeContext } from "./context";
import { TASK_EXIT } from "./format";
import { runToken, VERBS, type Verb } from "./verbs";

const GLOBAL_OPTIONS = {
  url: { type: "string" },
  token: { type: "string" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

const GLOBAL_HELP = `global options (before or after the verb):
  --url URL      the API: a coordinator (:8080) or scheduler (:8081); default TQ_URL, else ${DEFAULT_URL}
  --token TOKEN  an API token; default TQ_TOKEN
  --json         print the API's JSON instead of text (for scripts)
  -h, --help     help for tq or for one verb`;

const EXIT_HELP = `exit codes:
  ${EXIT.ok}  done
  ${EXIT.failure}  unexpected failure
  ${EXIT.usage}  usage: unknown verb or flag, a missing or malformed argument (nothing was sent)
  ${EXIT.notFound}  not found (404)
  ${EXIT.conflict}  the task's state does not allow it, or a name is taken (409)
  ${EXIT.auth}  no token, a bad one, or one without the scope (401/403)
  ${EXIT.invalid}  the API refused the input (400/413/415); the message names the field
  ${EXIT.unavailable}  the API is unreachable, busy or failing (429/5xx): try again
submit --wait and watch exit with the task's own status instead: its exit code; 128+N when
signal N killed it; ${TASK_EXIT.timedOut} timed out; ${TASK_EXIT.cancelled} cancelled; ${TASK_EXIT.noExitCode} failed without an exit code (could not
start, worker lost, no worker in time).`;

export function overallHelp(): string {
  const width = Math.max(...VERBS.map((verb) => verb.name.length));
  return [
    "usage: tq <verb> [options]   (bun run tq <verb> in the repository)",
    "",
    "verbs:",
    ...VERBS.map((verb) => `  ${verb.name.padEnd(width)}  ${verb.summary}`),
    "",
    GLOBAL_HELP,
    "",
    EXIT_HELP,
    "",
    "tq <verb> --help says more about each.",
  ].join("\n");
}

function verbHelp(verb: Verb): string {
  return [`usage: ${verb.usage.split("\n").join("\n       ")}`, "", verb.help, "", GLOBAL_HELP].join("\n");
}

/** The verb's position in argv: after any global options given first. */
function findVerb(argv: readonly string[]): number {
  let i = 0;
  while (i < argv.length) {
    const arg = argv[i] as string;
    if (arg === "--url" || arg === "--token") i += 2;
    else if (arg.startsWith("--url=") || arg.startsWith("--token=") || arg === "--json" || arg === "--help" || arg === "-h")
      i += 1;
    else break;
  }
  return i;
}

const write = (stream: NodeJS.WriteStream, text: string) => stream.write(text.endsWith("\n") ? text : `${text}\n`);

/** Runs tq with `argv` (the words after tq) and returns the exit code. */
export async function main(argv: readonly string[], env: Record<string, string | undefined>): Promise<number> {
  const at = findVerb(argv);
  const name = argv[at];
  const before = argv.slice(0, at);
  if (name === undefined) {
    const asked = before.includes("--help") || before.includes("-h");
    write(asked ? process.stdout : process.stderr, overallHelp());
    return asked ? EXIT.ok : EXIT.usage;
  }
  if (name === "help") {
    const verb = VERBS.find((v) => v.name === argv[at + 1]);
    write(process.stdout, verb ? verbHelp(verb) : overallHelp());
    return EXIT.ok;
  }
  const verb = VERBS.find((v) => v.name === name);
  if (!verb) {
    write(process.stderr, `tq: unknown verb ${JSON.stringify(name)}; one of: ${VERBS.map((v) => v.name).join(", ")} (tq --help)`);
    return EXIT.usage;
  }
  const rest = argv.slice(at + 1);
  try {
    if (verb.name === "token") {
      if (rest.length === 0 || rest.includes("--help") || rest.includes("-h")) {
        write(rest.length === 0 ? process.stderr : process.stdout, verbHelp(verb));
        return rest.length === 0 ? EXIT.usage : EXIT.ok;
      }
      return await runToken(rest);
    }
    let parsed: ReturnType<typeof parseArgs>;
    try {
      parsed = parseArgs({
        args: [...before, ...rest],
        options: { ...GLOBAL_OPTIONS, ...verb.options },
        allowPositionals: true,
        strict: true,
      });
    } catch (error) {
      throw new CliError(
        `${(error as Error).message.replace(/\. To specify a positional.*$/s, "")}; see tq ${verb.name} --help`,
        EXIT.usage,
      );
    }
    const values = parsed.values as Record<string, string | boolean | string[] | undefined>;
    if (values.help) {
      write(process.stdout, verbHelp(verb));
      return EXIT.ok;
    }
    const ctx = makeContext({
      url: (values.url as string | undefined) ?? env.TQ_URL,
      token: (values.token as string | undefined) ?? env.TQ_TOKEN,
      json: values.json === true,
    });
    return await verb.run(ctx, values, parsed.positionals);
  } catch (error) {
    if (error instanceof CliError) {
      write(process.stderr, `tq ${verb.name}: ${error.message}`);
      return error.exitCode;
    }
    write(process.stderr, `tq ${verb.name}: unexpected failure: ${error instanceof Error ? error.message : String(error)}`);
    return EXIT.failure;
  }
}

if (import.meta.main) {
  const code = await main(Bun.argv.slice(2), process.env);
  // Let stdout drain before exiting (a pipe may be slower than us).
  process.exitCode = code;
}
