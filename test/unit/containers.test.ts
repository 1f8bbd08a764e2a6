// The Dockerfile and docker-compose.yml cannot be run here (no Docker engine in CI), so this
// checks them statically against what the code expects: the Bun version, the package.json
// scripts, the configuration schema and its defaults, and the files in the repository.
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { type Config, ConfigSchema, coordinatorAddresses, loadConfig } from "../../src/config";

const root = join(import.meta.dir, "..", "..");
const read = (path: string) => Bun.file(join(root, path)).text();

// ---------------------------------------------------------------------------------------------
// Dockerfile: a small parser, enough for the instructions we use.

interface Instruction {
  keyword: string;
  args: string;
  line: number;
}

interface Stage {
  image: string;
  name: string | undefined;
  instructions: Instruction[];
}

/**
 * Splits a Dockerfile into instructions. As in Docker, a trailing `\` continues the line, and
 * comment and blank lines are dropped even inside a continuation; parser directives
 * (`# syntax=...`) are comments here.
 */
function parseDockerfile(text: string): Instruction[] {
  const instructions: Instruction[] = [];
  let pending = "";
  let start = 0;
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    if (pending === "") start = index + 1;
    if (line.endsWith("\\")) {
      pending += `${line.slice(0, -1).trimEnd()} `;
      return;
    }
    pending += line;
    const match = /^(\S+)\s*(.*)$/s.exec(pending);
    if (!match) throw new Error(`Dockerfile line ${start}: cannot parse "${pending}"`);
    instructions.push({ keyword: (match[1] ?? "").toUpperCase(), args: (match[2] ?? "").trim(), line: start });
    pending = "";
  });
  if (pending !== "") throw new Error(`Dockerfile ends inside a continuation that starts on line ${start}`);
  return instructions;
}

function stagesOf(instructions: Instruction[]): Stage[] {
  const stages: Stage[] = [];
  for (const instruction of instructions) {
    if (instruction.keyword === "FROM") {
      const words = instruction.args.split(/\s+/).filter((w) => !w.startsWith("--"));
      const asIndex = words.findIndex((w) => w.toUpperCase() === "AS");
      stages.push({
        image: words[0] ?? "",
        name: asIndex >= 0 ? words[asIndex + 1] : undefined,
        instructions: [],
      });
      continue;
    }
    const current = stages.at(-1);
    // ARG may precede the first FROM; nothing else may.
    if (!current) {
      if (instruction.keyword !== "ARG") {
        throw new Error(`Dockerfile line ${instruction.line}: ${instruction.keyword} before FROM`);
      }
      continue;
    }
    current.instructions.push(instruction);
  }
  return stages;
}

/** CMD/ENTRYPOINT/RUN arguments as argv: exec (JSON) form as is, shell form through sh -c. */
function argv(args: string): string[] {
  if (args.startsWith("[")) {
    const parsed: unknown = JSON.parse(args);
    if (!Array.isArray(parsed) || !parsed.every((a) => typeof a === "string")) {
      throw new Error(`exec form is not a list of strings: ${args}`);
    }
    return parsed;
  }
  return ["/bin/sh", "-c", args];
}

interface Copy {
  from: string | undefined;
  sources: string[];
  destination: string;
  line: number;
}

function copiesOf(stage: Stage): Copy[] {
  return stage.instructions
    .filter((i) => i.keyword === "COPY" || i.keyword === "ADD")
    .map((i) => {
      const words = i.args.startsWith("[") ? argv(i.args) : i.args.split(/\s+/);
      const flags = words.filter((w) => w.startsWith("--"));
      const paths = words.filter((w) => !w.startsWith("--"));
      const from = flags.find((f) => f.startsWith("--from="))?.slice("--from=".length);
      const destination = paths.at(-1);
      if (destination === undefined || paths.length < 2) {
        throw new Error(`Dockerfile line ${i.line}: COPY needs a source and a destination`);
      }
      return { from, sources: paths.slice(0, -1), destination, line: i.line };
    });
}

/** ENV in both forms: `ENV A=1 B="two words"` and the legacy `ENV A 1`. */
function envOf(stage: Stage): Record<string, string> {
  const env: Record<string, string> = {};
  for (const { keyword, args } of stage.instructions) {
    if (keyword !== "ENV") continue;
    const legacy = /^([A-Za-z_][A-Za-z0-9_]*)\s+([^=]*)$/.exec(args);
    if (legacy?.[1] !== undefined) {
      env[legacy[1]] = legacy[2] ?? "";
      continue;
    }
    for (const pair of args.matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("([^"]*)"|'([^']*)'|\S*)/g)) {
      env[pair[1] ?? ""] = pair[3] ?? pair[4] ?? pair[2] ?? "";
    }
  }
  return env;
}

/** .dockerignore: the last matching pattern wins; a pattern that matches a folder excludes its contents. */
function dockerIgnored(patterns: string[], path: string): boolean {
  const parts = path.replace(/^\.\//, "").split("/");
  const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join("/"));
  let ignored = false;
  for (const raw of patterns) {
    const negated = raw.startsWith("!");
    const pattern = raw
      .slice(negated ? 1 : 0)
      .replace(/^\/+/, "")
      .replace(/\/+$/, "");
    const glob = new Bun.Glob(pattern);
    if (prefixes.some((p) => glob.match(p))) ignored = !negated;
  }
  return ignored;
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml: parsed with Bun.YAML, then interpolated as Compose does.

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function record(value: unknown, where: string): Record<string, unknown> {
  if (!isRecord(value)) throw new Error(`${where} is not a mapping`);
  return value;
}

/** The committed example of the (git-ignored) .env that compose reads secrets from. */
function envExample(): Record<string, string> {
  const vars: Record<string, string> = {};
  for (const line of readFileSync(join(root, ".env.example"), "utf8").split("\n")) {
    const match = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (match) vars[match[1]!] = match[2]!;
  }
  return vars;
}

/**
 * Compose interpolation as with a .env made from .env.example: `${VAR:-default}` and
 * `${VAR-default}` become their default, `${VAR:?message}` (a required secret) the example's
 * value, and `$$` a literal `$`. A required variable the example lacks, or a variable with no
 * default, throws.
 */
function interpolate(value: string, vars: Record<string, string> = {}): string {
  const variable = /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*)|:\?([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g;
  return value.replace(variable, (match, braced, dash, fallback, required, bare) => {
    if (match === "$$") return "$";
    if (typeof dash === "string") return fallback;
    if (typeof required === "string") {
      const given = vars[braced];
      if (given === undefined) throw new Error(`\${${braced}} is required but .env.example does not set it`);
      return given;
    }
    throw new Error(`\${${braced ?? bare}} has no default in docker-compose.yml`);
  });
}

function interpolateDeep(value: unknown, vars: Record<string, string> = envExample()): unknown {
  if (typeof value === "string") return interpolate(value, vars);
  if (Array.isArray(value)) return value.map((v) => interpolateDeep(v, vars));
  if (isRecord(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, interpolateDeep(v, vars)]));
  return value;
}

/** A service's environment, in either Compose form (mapping or `KEY=value` list). */
function environmentOf(service: Record<string, unknown>): Record<string, string | undefined> {
  const raw = service.environment;
  if (raw === undefined) return {};
  const env: Record<string, string | undefined> = {};
  if (Array.isArray(raw)) {
    for (const entry of raw) {
      const [key = "", ...rest] = String(entry).split("=");
      env[key] = rest.length > 0 ? rest.join("=") : undefined;
    }
    return env;
  }
  for (const [key, value] of Object.entries(record(raw, "environment"))) {
    // A key with no value is taken from the host's environment, which is unset here.
    env[key] = value === null || value === undefined ? undefined : String(value);
  }
  return env;
}

interface PublishedPort {
  hostIp: string | undefined;
  published: string | undefined;
  target: number;
}

/** Short syntax ("[ip:][published:]target[/proto]") and long syntax ({ target, published, host_ip }). */
function portsOf(service: Record<string, unknown>): PublishedPort[] {
  const raw = service.ports;
  if (raw === undefined) return [];
  if (!Array.isArray(raw)) throw new Error("ports is not a list");
  return raw.map((entry): PublishedPort => {
    if (isRecord(entry)) {
      return {
        hostIp: entry.host_ip === undefined ? undefined : String(entry.host_ip),
        published: entry.published === undefined ? undefined : String(entry.published),
        target: Number(entry.target),
      };
    }
    const parts = String(entry)
      .replace(/\/(tcp|udp)$/, "")
      .split(":");
    const target = Number(parts.at(-1));
    if (parts.length === 3) return { hostIp: parts[0], published: parts[1], target };
    if (parts.length === 2) return { hostIp: undefined, published: parts[0], target };
    return { hostIp: undefined, published: undefined, target };
  });
}

/** depends_on in either form; the list form means condition service_started. */
function dependenciesOf(service: Record<string, unknown>): Record<string, string> {
  const raw = service.depends_on;
  if (raw === undefined) return {};
  if (Array.isArray(raw)) return Object.fromEntries(raw.map((name) => [String(name), "service_started"]));
  return Object.fromEntries(
    Object.entries(record(raw, "depends_on")).map(([name, options]) => [
      name,
      isRecord(options) && typeof options.condition === "string" ? options.condition : "service_started",
    ]),
  );
}

/** Go-style durations as Compose writes them: "40s", "1m30s", "500ms". */
function durationMs(value: string): number {
  const units: Record<string, number> = { us: 0.001, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  let total = 0;
  const rest = value.replace(/(\d+(?:\.\d+)?)(us|ms|s|m|h)/g, (_, amount: string, unit: string) => {
    total += Number(amount) * (units[unit] ?? Number.NaN);
    return "";
  });
  if (rest !== "" || value === "") throw new Error(`not a duration: "${value}"`);
  return total;
}

// ---------------------------------------------------------------------------------------------

const packageJson = record(JSON.parse(await read("package.json")), "package.json");
const scripts = record(packageJson.scripts, "package.json scripts");
const devDependencies = record(packageJson.devDependencies, "package.json devDependencies");

const stages = stagesOf(parseDockerfile(await read("Dockerfile")));
const finalStage = stages.at(-1);
if (!finalStage) throw new Error("Dockerfile has no FROM");
const imageEnv = envOf(finalStage);
const ignorePatterns = (await read(".dockerignore"))
  .split(/\r?\n/)
  .map((l) => l.trim())
  .filter((l) => l !== "" && !l.startsWith("#"));

const compose = record(interpolateDeep(Bun.YAML.parse(await read("docker-compose.yml"))), "docker-compose.yml");
const services = record(compose.services, "services");
const service = (name: string) => record(services[name], `service ${name}`);
const roles = ["coordinator", "scheduler", "worker"] as const;

/** What a role's process sees: the image's ENV overlaid by the service's environment. */
function roleEnv(name: string): Record<string, string | undefined> {
  return { ...imageEnv, ...environmentOf(service(name)) };
}
const roleConfig = (name: string): Config => loadConfig(roleEnv(name));

const schemaKeys = new Set(Object.keys(ConfigSchema.properties));

describe("Dockerfile", () => {
  test("every stage builds on the official oven/bun image at the Bun version package.json pins", () => {
    const range = devDependencies["bun-types"];
    expect(typeof range).toBe("string");
    const pinned = String(range).replace(/^[\^~=v]+/, "");
    expect(pinned).toMatch(/^\d+\.\d+\.\d+$/);

    const stageNames = new Set<string>();
    for (const stage of stages) {
      if (!stageNames.has(stage.image)) {
        // Distroless has no /bin/sh, which the worker needs for `sh -c <command>`.
        const match = /^oven\/bun:(\d+\.\d+\.\d+)(-slim|-debian|-alpine)?$/.exec(stage.image);
        expect(match?.[1]).toBe(pinned);
      }
      if (stage.name !== undefined) stageNames.add(stage.name);
    }
  });

  test("the final stage runs as a non-root user, set before its command", () => {
    const instructions = finalStage.instructions;
    const commandAt = instructions.findIndex((i) => i.keyword === "CMD" || i.keyword === "ENTRYPOINT");
    expect(commandAt).toBeGreaterThanOrEqual(0);
    const user = instructions.slice(0, commandAt).findLast((i) => i.keyword === "USER");
    expect(user).toBeDefined();
    const name = (user?.args ?? "").split(":")[0] ?? "";
    expect(["", "root", "0"]).not.toContain(name);
    // A later USER would be the one in effect.
    expect(instructions.slice(commandAt).some((i) => i.keyword === "USER")).toBe(false);
  });

  test("the default command runs the coordinator through its package.json script", () => {
    const cmd = finalStage.instructions.findLast((i) => i.keyword === "CMD");
    expect(finalStage.instructions.some((i) => i.keyword === "ENTRYPOINT")).toBe(false);
    const command = argv(cmd?.args ?? "[]");
    expect(command).toEqual(["bun", "run", "coordinator"]);
    expect(scripts).toHaveProperty("coordinator");
  });

  test("the image binds every interface and sets only known options", () => {
    expect(imageEnv.TQ_HOST).toBe("0.0.0.0");
    for (const key of Object.keys(imageEnv)) {
      if (key.startsWith("TQ_") || key === "DATABASE_URL") expect(schemaKeys).toContain(key);
    }
    expect(() => loadConfig(imageEnv)).not.toThrow();
  });

  test("COPY sources exist in the repository and are not excluded by .dockerignore", () => {
    const fromContext = stages.flatMap(copiesOf).filter((c) => c.from === undefined);
    expect(fromContext.length).toBeGreaterThan(0);
    for (const copy of fromContext) {
      for (const source of copy.sources) {
        expect(source.split("/")).not.toContain("..");
        expect({ source, exists: existsSync(join(root, source)) }).toEqual({ source, exists: true });
        expect({ source, ignored: dockerIgnored(ignorePatterns, source) }).toEqual({ source, ignored: false });
      }
    }
  });

  test("COPY --from names an earlier stage", () => {
    stages.forEach((stage, index) => {
      const earlier = stages.slice(0, index).map((s) => s.name);
      for (const copy of copiesOf(stage)) {
        if (copy.from !== undefined) expect(earlier).toContain(copy.from);
      }
    });
  });

  test("dependencies install from the lockfile, in a stage that has copied it", () => {
    const installs = stages.flatMap((stage) =>
      stage.instructions
        .filter((i) => i.keyword === "RUN" && /\bbun\s+(install|i)\b/.test(i.args))
        .map((i) => ({ stage, instruction: i })),
    );
    expect(installs.length).toBeGreaterThan(0);
    for (const { stage, instruction } of installs) {
      expect(instruction.args).toContain("--frozen-lockfile");
      expect(instruction.args).toContain("--production");
      const copied = copiesOf(stage)
        .filter((c) => c.from === undefined && c.line < instruction.line)
        .flatMap((c) => c.sources);
      expect(copied).toContain("package.json");
      expect(copied).toContain("bun.lock");
    }
  });

  test("the final stage holds package.json and every file the role scripts run", () => {
    const copied = copiesOf(finalStage).flatMap((c) => c.sources.map((s) => s.replace(/^\.\//, "").replace(/\/$/, "")));
    expect(copied).toContain("package.json");
    expect(copies(finalStage, "node_modules")).toBe(true);
    for (const role of roles) {
      const script = String(scripts[role]);
      const entry = /^bun\s+(?:run\s+)?(\S+\.ts)$/.exec(script)?.[1];
      expect({ role, entry }).toEqual({ role, entry: expect.any(String) });
      expect({ role, entry, copied: copied.some((c) => entry === c || entry?.startsWith(`${c}/`)) }).toEqual({
        role,
        entry,
        copied: true,
      });
    }
  });

  test(".dockerignore keeps host dependencies, data, history and secrets out of the build context", () => {
    for (const path of ["node_modules", ".data", ".git", ".env", "bench/results", "test"]) {
      expect({ path, ignored: dockerIgnored(ignorePatterns, path) }).toEqual({ path, ignored: true });
    }
    expect(dockerIgnored(ignorePatterns, "src/config.ts")).toBe(false);
  });
});

/** Whether a stage gets `name` (a folder) by some COPY, from the context or another stage. */
function copies(stage: Stage, name: string): boolean {
  return copiesOf(stage).some((c) => c.sources.some((s) => s.replace(/\/$/, "").split("/").at(-1) === name));
}

describe("docker-compose.yml", () => {
  test("defines postgres and the three roles, all roles built from the one Dockerfile into one image", () => {
    expect(Object.keys(services).sort()).toEqual(["coordinator", "postgres", "scheduler", "worker"]);
    const images = new Set<unknown>();
    for (const role of roles) {
      const build = service(role).build;
      const context = isRecord(build) ? build.context : build;
      expect({ role, context }).toEqual({ role, context: "." });
      if (isRecord(build)) expect(build.dockerfile ?? "Dockerfile").toBe("Dockerfile");
      expect(typeof service(role).image).toBe("string");
      images.add(service(role).image);
    }
    expect(images.size).toBe(1);
  });

  test("each role runs `bun run <its own name>`, a script in package.json", () => {
    for (const role of roles) {
      const command = service(role).command;
      const list = typeof command === "string" ? command.split(/\s+/) : command;
      expect({ role, command: list }).toEqual({ role, command: ["bun", "run", role] });
      expect(scripts).toHaveProperty(role);
    }
  });

  test("roles restart unless stopped", () => {
    for (const role of roles) expect({ role, restart: service(role).restart }).toEqual({ role, restart: "unless-stopped" });
  });

  test("role environments name only DATABASE_URL and options of the config schema", () => {
    for (const role of roles) {
      for (const key of Object.keys(environmentOf(service(role)))) {
        expect({ role, key, known: key === "DATABASE_URL" || schemaKeys.has(key) }).toEqual({ role, key, known: true });
      }
    }
  });

  test("every role's environment, with Compose defaults substituted, loads as configuration", () => {
    for (const role of roles) expect(() => roleConfig(role)).not.toThrow();
  });

  test("DATABASE_URL reaches the postgres service with the credentials postgres is created with", () => {
    const pg = environmentOf(service("postgres"));
    for (const role of ["coordinator", "scheduler"]) {
      const url = new URL(roleConfig(role).DATABASE_URL ?? "missing:");
      expect(url.protocol).toMatch(/^postgres(ql)?:$/);
      expect(url.hostname).toBe("postgres");
      expect(url.port === "" ? "5432" : url.port).toBe("5432");
      expect(decodeURIComponent(url.username)).toBe(pg.POSTGRES_USER ?? "");
      expect(decodeURIComponent(url.password)).toBe(pg.POSTGRES_PASSWORD ?? "");
      expect(url.pathname).toBe(`/${pg.POSTGRES_DB ?? ""}`);
    }
  });

  test("the servers bind every interface and publish their configured ports on loopback only", () => {
    const expected: Record<string, (c: Config) => number[]> = {
      coordinator: (c) => [c.TQ_COORDINATOR_PORT, c.TQ_GRPC_PORT],
      scheduler: (c) => [c.TQ_SCHEDULER_PORT],
    };
    for (const [role, portsFor] of Object.entries(expected)) {
      const config = roleConfig(role);
      expect({ role, host: config.TQ_HOST }).toEqual({ role, host: "0.0.0.0" });
      const ports = portsOf(service(role));
      expect(ports.map((p) => p.target).sort()).toEqual(portsFor(config).sort());
      for (const port of ports) {
        expect(port.hostIp).toBe("127.0.0.1");
        expect(port.published).toBe(String(port.target));
      }
    }
  });

  test("the worker can scale: no published ports, no container_name, no database credentials", () => {
    const worker = service("worker");
    expect(portsOf(worker)).toEqual([]);
    expect(worker.container_name).toBeUndefined();
    expect(environmentOf(worker).DATABASE_URL).toBeUndefined();
  });

  test("the worker dials the coordinator service on its gRPC port", () => {
    const grpcPort = roleConfig("coordinator").TQ_GRPC_PORT;
    const addresses = coordinatorAddresses(roleConfig("worker"));
    expect(addresses.length).toBeGreaterThan(0);
    for (const address of addresses) expect(address).toBe(`coordinator:${grpcPort}`);
  });

  test("the worker's stop grace period covers its drain and kill grace", () => {
    const config = roleConfig("worker");
    const grace = service("worker").stop_grace_period;
    expect(typeof grace).toBe("string");
    expect(durationMs(String(grace))).toBeGreaterThan(config.TQ_DRAIN_GRACE_MS + config.TQ_KILL_GRACE_MS);
  });

  test("postgres is the official image with a pg_isready healthcheck and a named volume for its data", () => {
    const pg = service("postgres");
    expect(pg.image).toBe("postgres:17");
    const check = record(pg.healthcheck, "postgres healthcheck");
    const probe = Array.isArray(check.test) ? check.test.map(String) : String(check.test).split(/\s+/);
    expect(probe).toContain("pg_isready");
    const declared = Object.keys(record(compose.volumes, "volumes"));
    const mounts = (Array.isArray(pg.volumes) ? pg.volumes : []).map((v) => {
      if (isRecord(v)) return { source: String(v.source), target: String(v.target) };
      const [source = "", target = ""] = String(v).split(":");
      return { source, target };
    });
    // /var/lib/postgresql/data is PGDATA up to postgres:17 (18 moved it).
    expect(mounts).toContainEqual({ source: expect.any(String), target: "/var/lib/postgresql/data" });
    for (const mount of mounts) expect(declared).toContain(mount.source);
  });

  test("every role waits for a healthy postgres, directly when it holds DATABASE_URL", () => {
    const waitsForPostgres = (name: string, seen: Set<string>): boolean => {
      if (seen.has(name)) return false;
      seen.add(name);
      const deps = dependenciesOf(service(name));
      if (deps.postgres === "service_healthy") return true;
      return Object.keys(deps).some((dep) => dep !== "postgres" && dep in services && waitsForPostgres(dep, seen));
    };
    for (const role of roles) {
      expect({ role, waits: waitsForPostgres(role, new Set()) }).toEqual({ role, waits: true });
      if (environmentOf(service(role)).DATABASE_URL !== undefined) {
        expect({ role, condition: dependenciesOf(service(role)).postgres }).toEqual({ role, condition: "service_healthy" });
      }
    }
  });
});

/** Compose memory sizes as Docker reads them: "512m", "2g", "1048576", "1.5g". */
function bytesOf(value: unknown): number {
  const match = /^(\d+(?:\.\d+)?)\s*([bkmg]?)b?$/i.exec(String(value).trim());
  if (!match) throw new Error(`not a memory size: ${JSON.stringify(value)}`);
  const unit: Record<string, number> = { "": 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 };
  return Number(match[1]) * (unit[(match[2] ?? "").toLowerCase()] ?? Number.NaN);
}

/** mem_limit, or the deploy.resources.limits.memory form. */
function memoryLimitOf(service: Record<string, unknown>): number | undefined {
  if (service.mem_limit !== undefined) return bytesOf(service.mem_limit);
  const deploy = isRecord(service.deploy) ? service.deploy : {};
  const resources = isRecord(deploy.resources) ? deploy.resources : {};
  const limits = isRecord(resources.limits) ? resources.limits : {};
  return limits.memory === undefined ? undefined : bytesOf(limits.memory);
}

/** A healthcheck's test as argv (CMD form), or through sh (CMD-SHELL and the string form). */
function healthcheckArgv(service: Record<string, unknown>): string[] {
  const check = record(service.healthcheck, "healthcheck");
  const test = check.test;
  if (typeof test === "string") return ["/bin/sh", "-c", test];
  if (!Array.isArray(test)) throw new Error("healthcheck test is neither a string nor a list");
  const [form, ...rest] = test.map(String);
  if (form === "CMD") return rest;
  if (form === "CMD-SHELL") return ["/bin/sh", "-c", rest.join(" ")];
  throw new Error(`healthcheck test form ${form} is not CMD or CMD-SHELL`);
}

/** Runs a healthcheck's argv here (its executable is the image's bun), with `rewrite` applied to its script. */
async function runCheck(argv: string[], rewrite: (script: string) => string): Promise<number> {
  const [executable, ...args] = argv;
  expect(executable).toBe("bun");
  const proc = Bun.spawn([process.execPath, ...args.map((a, i) => (args[i - 1] === "-e" ? rewrite(a) : a))], {
    stdout: "ignore",
    stderr: "ignore",
  });
  return proc.exited;
}

const apiRoles = ["coordinator", "scheduler"] as const;
/** What the worker may be given back (see docker-compose.yml): slot users need no more. */
const WORKER_CAPABILITIES = new Set(["SETUID", "SETGID", "CHOWN", "KILL"]);
const normalCap = (cap: unknown) => String(cap).toUpperCase().replace(/^CAP_/, "");

describe("docker-compose.yml limits and privileges", () => {
  test("every role drops all capabilities; the API roles get none back, the worker at most what slot users need", () => {
    for (const role of roles) {
      const dropped = (Array.isArray(service(role).cap_drop) ? (service(role).cap_drop as unknown[]) : []).map(normalCap);
      expect({ role, dropped }).toEqual({ role, dropped: ["ALL"] });
      const added = (Array.isArray(service(role).cap_add) ? (service(role).cap_add as unknown[]) : []).map(normalCap);
      if ((apiRoles as readonly string[]).includes(role)) expect({ role, added }).toEqual({ role, added: [] });
      for (const cap of added) expect({ role, cap, allowed: WORKER_CAPABILITIES.has(cap) }).toEqual({ role, cap, allowed: true });
      expect({ role, privileged: service(role).privileged ?? false }).toEqual({ role, privileged: false });
    }
  });

  test("every role sets no-new-privileges", () => {
    for (const role of roles) {
      const options = (Array.isArray(service(role).security_opt) ? (service(role).security_opt as unknown[]) : []).map(String);
      expect({ role, nnp: options.some((o) => /^no-new-privileges(:true|=true)?$/.test(o)) }).toEqual({ role, nnp: true });
    }
  });

  test("the API roles run on a read-only root with a small tmpfs /tmp, and Bun writes no transpiler cache", () => {
    for (const role of apiRoles) {
      expect({ role, readOnly: service(role).read_only }).toEqual({ role, readOnly: true });
      const tmpfs = [service(role).tmpfs ?? []].flat().map((t) => String(t).split(":")[0]);
      expect({ role, tmpfs }).toEqual({ role, tmpfs: ["/tmp"] });
    }
    // Bun would otherwise cache transpiled sources under the user's home, unwritable there.
    expect(imageEnv.BUN_RUNTIME_TRANSPILER_CACHE_PATH).toBe("0");
  });

  test("every role has a pids limit and a memory limit; the worker's leave room for every slot's task", () => {
    for (const role of roles) {
      const pids = service(role).pids_limit;
      expect({ role, pids: typeof pids === "number" && Number.isInteger(pids) && pids > 0 }).toEqual({ role, pids: true });
      const memory = memoryLimitOf(service(role));
      expect({ role, memory: memory !== undefined && memory >= 128 * 1024 ** 2 }).toEqual({ role, memory: true });
    }
    const slots = roleConfig("worker").TQ_WORKER_SLOTS;
    // Each task is at least sh and a child; the worker itself has its threads.
    expect(Number(service("worker").pids_limit)).toBeGreaterThan(slots * 16);
    expect(memoryLimitOf(service("worker"))!).toBeGreaterThan(memoryLimitOf(service("coordinator"))!);
  });

  test("every service has a healthcheck whose executable is in its image; roles use bun, as the slim image has no curl or wget", () => {
    for (const name of Object.keys(services)) {
      const check = record(service(name).healthcheck, `${name} healthcheck`);
      for (const key of ["interval", "timeout"]) expect(durationMs(String(check[key]))).toBeGreaterThan(0);
      if (check.start_period !== undefined) expect(durationMs(String(check.start_period))).toBeGreaterThan(0);
    }
    expect(finalStage.image).toMatch(/-slim$/);
    for (const role of roles) {
      const argv = healthcheckArgv(service(role));
      expect({ role, executable: argv[0] }).toEqual({ role, executable: "bun" });
      expect(argv.join(" ")).not.toMatch(/\b(curl|wget)\b/);
    }
  });

  test("a role another waits on as healthy has a healthcheck; workers wait for a healthy coordinator", () => {
    for (const name of Object.keys(services)) {
      for (const [dependency, condition] of Object.entries(dependenciesOf(service(name)))) {
        if (condition === "service_healthy")
          expect({ name, dependency, check: service(dependency).healthcheck !== undefined }).toEqual({
            name,
            dependency,
            check: true,
          });
      }
    }
    expect(dependenciesOf(service("worker")).coordinator).toBe("service_healthy");
  });

  test("the API roles' healthchecks ask their own port's /healthz, and fail when it does not answer 200", async () => {
    const ports: Record<(typeof apiRoles)[number], number> = {
      coordinator: roleConfig("coordinator").TQ_COORDINATOR_PORT,
      scheduler: roleConfig("scheduler").TQ_SCHEDULER_PORT,
    };
    for (const role of apiRoles) {
      const argv = healthcheckArgv(service(role));
      const target = `http://127.0.0.1:${ports[role]}/healthz`;
      expect({ role, asks: argv.join(" ").includes(target) }).toEqual({ role, asks: true });
      // The same script, pointed at a stand-in on a free port of this host.
      let status = 200;
      const server = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("{}", { status }) });
      const pointed = (script: string) => script.replace(target, `http://127.0.0.1:${server.port}/healthz`);
      try {
        expect({ role, healthy: await runCheck(argv, pointed) }).toEqual({ role, healthy: 0 });
        status = 503;
        expect({ role, unhealthy: await runCheck(argv, pointed) }).not.toEqual({ role, unhealthy: 0 });
      } finally {
        server.stop(true);
      }
      expect({ role, down: await runCheck(argv, pointed) }).not.toEqual({ role, down: 0 });
    }
  });

  test("the worker's healthcheck finds a live worker process and fails without one", async () => {
    const argv = healthcheckArgv(service("worker"));
    const script = argv[argv.indexOf("-e") + 1] ?? "";
    expect(script).toContain("src/worker/main.ts");
    // This host may run other workers: look for a name only the stand-in carries.
    const marker = `tq-health-${Bun.randomUUIDv7()}/main.ts`;
    const marked = (text: string) => text.replace("src/worker/main.ts", marker);
    const standIn = Bun.spawn(["sh", "-c", "read line", marker], { stdin: "pipe", stdout: "ignore" });
    try {
      expect(await runCheck(argv, marked)).toBe(0);
    } finally {
      standIn.stdin.end();
      await standIn.exited;
    }
    expect(await runCheck(argv, marked)).not.toBe(0);
  });
});

describe("test helpers", () => {
  // The checks above are only as good as these parsers; pin their edge cases.
  test("parseDockerfile joins continuations and drops comments inside them", () => {
    const parsed = parseDockerfile('# syntax=docker/dockerfile:1\nFROM a AS b\nRUN one \\\n  # note\n\n  two\ncmd ["x"]\n');
    expect(parsed).toEqual([
      { keyword: "FROM", args: "a AS b", line: 2 },
      { keyword: "RUN", args: "one two", line: 3 },
      { keyword: "CMD", args: '["x"]', line: 7 },
    ]);
    expect(() => parseDockerfile("RUN a \\\n")).toThrow(/continuation/);
  });

  test("interpolate substitutes defaults and refuses variables without one", () => {
    expect(interpolate("${A:-x}:${B-y}@$${C}")).toBe("x:y@${C}");
    expect(() => interpolate("${NOPE}")).toThrow(/no default/);
    expect(() => interpolate("$NOPE")).toThrow(/no default/);
  });

  test("dockerIgnored honours folders, globs and negation", () => {
    expect(dockerIgnored(["bench/results"], "bench/results/x.json")).toBe(true);
    expect(dockerIgnored(["bench/results"], "bench/run.ts")).toBe(false);
    expect(dockerIgnored(["*.log", "!keep.log"], "keep.log")).toBe(false);
    expect(dockerIgnored(["*.log"], "a.log")).toBe(true);
  });

  test("bytesOf reads Docker memory sizes", () => {
    expect(bytesOf("512m")).toBe(512 * 1024 ** 2);
    expect(bytesOf("2g")).toBe(2 * 1024 ** 3);
    expect(bytesOf(1048576)).toBe(1048576);
    expect(() => bytesOf("lots")).toThrow();
  });

  test("durationMs reads Go durations", () => {
    expect(durationMs("1m30s")).toBe(90_000);
    expect(durationMs("500ms")).toBe(500);
    expect(() => durationMs("40")).toThrow();
  });
});

test("compose secrets come from a .env that git ignores, with a committed example", () => {
  expect(readFileSync(join(root, ".gitignore"), "utf8").split("\n")).toContain(".env");
  expect(existsSync(join(root, ".env.example"))).toBe(true);
  const compose = readFileSync(join(root, "docker-compose.yml"), "utf8");
  for (const secret of ["POSTGRES_PASSWORD", "TQ_WORKER_TOKEN", "TQ_API_TOKENS"]) {
    expect(compose).toContain(`\${${secret}:?`);
    expect(Object.keys(envExample())).toContain(secret);
  }
});

// docker-compose.ha.yml (README, "Production"): parsed and interpolated as docker-compose.yml.
describe("docker-compose.ha.yml", () => {
  const ha = record(interpolateDeep(Bun.YAML.parse(readFileSync(join(root, "docker-compose.ha.yml"), "utf8"))), "ha");
  const haServices = record(ha.services, "services");
  const haService = (name: string) => record(haServices[name], `service ${name}`);
  const haRoles = ["coordinator1", "coordinator2", "scheduler", "worker"];
  const haConfig = (name: string) => loadConfig({ ...imageEnv, ...environmentOf(haService(name)) });
  const patroni = Bun.YAML.parse(readFileSync(join(root, "deploy/patroni/patroni.yml"), "utf8")) as {
    etcd3: { hosts: string };
    bootstrap: {
      dcs: { ttl: number; loop_wait: number; retry_timeout: number; synchronous_mode: boolean; primary_start_timeout: number };
    };
  };

  test("three etcd members, two Patroni PostgreSQL nodes, two coordinators, a scheduler and workers", () => {
    expect(Object.keys(haServices).sort()).toEqual(
      ["coordinator1", "coordinator2", "etcd1", "etcd2", "etcd3", "pg1", "pg2", "scheduler", "worker"].sort(),
    );
    for (const pg of ["pg1", "pg2"]) expect({ pg, build: haService(pg).build }).toEqual({ pg, build: "deploy/patroni" });
    expect(patroni.etcd3.hosts.split(",").sort()).toEqual(["etcd1:2379", "etcd2:2379", "etcd3:2379"]);
  });

  test("every role with a database reaches both nodes through one multi-host URL that asks for the primary", () => {
    for (const role of ["coordinator1", "coordinator2", "scheduler"]) {
      const config = haConfig(role);
      const match = /^postgres:\/\/[^@]+@([^/]+)\/taskqueue\?(.*)$/.exec(config.DATABASE_URL ?? "");
      expect({ role, match: match !== null }).toEqual({ role, match: true });
      expect(match![1]!.split(",").sort()).toEqual(["pg1:5432", "pg2:5432"]);
      expect(new URLSearchParams(match![2]).get("target_session_attrs")).toBe("primary");
    }
    expect(environmentOf(haService("worker")).DATABASE_URL).toBeUndefined();
  });

  test("every role's environment loads as configuration; coordinators have ids of their own; workers dial both", () => {
    for (const role of haRoles) expect(() => haConfig(role)).not.toThrow();
    expect(haConfig("coordinator1").TQ_COORDINATOR_ID).not.toBe(haConfig("coordinator2").TQ_COORDINATOR_ID);
    expect(coordinatorAddresses(haConfig("worker")).sort()).toEqual(["coordinator1:50051", "coordinator2:50051"]);
  });

  test("Patroni's timing is what the README's guarantees assume", () => {
    const { ttl, loop_wait, retry_timeout, synchronous_mode, primary_start_timeout } = patroni.bootstrap.dcs;
    expect(synchronous_mode).toBe(true);
    expect(primary_start_timeout).toBe(0);
    // Patroni's own rule: loop_wait + 2 * retry_timeout <= ttl.
    expect(loop_wait + 2 * retry_timeout).toBeLessThanOrEqual(ttl);
    for (const role of ["coordinator1", "coordinator2", "scheduler"]) {
      const config = haConfig(role);
      // A query's own deadline outlasts the server's statement timeout, and ends well within a lease.
      expect(config.TQ_DB_QUERY_TIMEOUT_MS).toBeGreaterThan(config.TQ_DB_STATEMENT_TIMEOUT_MS);
      expect(config.TQ_DB_QUERY_TIMEOUT_MS).toBeLessThan(config.TQ_DEFAULT_LEASE_MS);
    }
  });
});
