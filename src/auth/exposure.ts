// Safe defaults: a role that listens beyond loopback must be protected, or told explicitly
// (TQ_INSECURE=true) that it need not be, in which case it says so on every start. Tokens and
// tasks' secret_env travel on the coordinator's links, so beyond loopback those links must be
// TLS: a coordinator listening there serves TLS, a worker dialing there dials TLS.
import { type Config, ConfigError } from "../config";
import type { Logger } from "../log";

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host === "[::1]" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/**
 * Refuses (throws) an exposed role without protection: API tokens for the HTTP API and
 * TaskService, and for the coordinator's WorkerService a worker token or mutual TLS.
 */
export function checkExposure(config: Config, role: "scheduler" | "coordinator", apiTokens: number, log: Logger): void {
  if (isLoopback(config.TQ_HOST)) return;
  const missing: string[] = [];
  if (apiTokens === 0) missing.push("API tokens (bun run token create --name NAME --scope submit,read, or TQ_API_TOKENS)");
  if (role === "coordinator" && !config.TQ_WORKER_TOKEN && !config.TQ_WORKER_TOKENS && !config.TQ_TLS_CLIENT_CA) {
    missing.push("a worker token (TQ_WORKER_TOKEN or TQ_WORKER_TOKENS) or mutual TLS (TQ_TLS_CLIENT_CA)");
  }
  if (role === "coordinator" && !config.TQ_TLS_CERT) {
    missing.push(
      "TLS (TQ_TLS_CERT and TQ_TLS_KEY: worker and API tokens and tasks' secret_env would cross the network in plaintext)",
    );
  }
  if (missing.length === 0) return;
  if (config.TQ_INSECURE) {
    log.warn(
      { host: config.TQ_HOST, missing },
      `INSECURE: the ${role} listens on ${config.TQ_HOST} without ${missing.join(" or ")}; whoever can reach or watch it can run commands or read secrets`,
    );
    return;
  }
  throw new ConfigError(
    `the ${role} would listen on ${config.TQ_HOST} (beyond loopback) without ${missing.join(" and ")}; ` +
      "configure them, bind TQ_HOST=127.0.0.1, or set TQ_INSECURE=true to run unprotected",
  );
}

/** The host of a "host:port" or "[v6]:port" dial address. */
function hostOf(address: string): string {
  const v6 = /^\[([^\]]+)\]:\d+$/.exec(address);
  return v6 ? v6[1]! : address.replace(/:\d+$/, "");
}

/**
 * Refuses (throws) a worker that would dial a coordinator beyond loopback in plaintext: its
 * join token and credential, and every task's secret_env, would cross the network readable.
 * TLS is on when TQ_TLS_CA or a client certificate is set (src/tls.ts).
 */
export function checkWorkerExposure(config: Config, addresses: readonly string[], log: Logger): void {
  if (config.TQ_TLS_CA || config.TQ_TLS_CLIENT_CERT) return;
  const exposed = addresses.filter((address) => !isLoopback(hostOf(address)));
  if (exposed.length === 0) return;
  if (config.TQ_INSECURE) {
    log.warn(
      { addresses: exposed },
      `INSECURE: the worker dials ${exposed.join(", ")} without TLS; its token and tasks' secret_env cross the network in plaintext`,
    );
    return;
  }
  throw new ConfigError(
    `the worker would dial ${exposed.join(", ")} (beyond loopback) without TLS, sending its token and tasks' secret_env in plaintext; ` +
      "set TQ_TLS_CA (the coordinators' CA) and serve TLS there, or set TQ_INSECURE=true to dial in plaintext",
  );
}
