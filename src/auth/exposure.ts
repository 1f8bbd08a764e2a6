// Safe defaults: a role that listens beyond loopback must be protected, or told explicitly
// (TQ_INSECURE=true) that it need not be, in which case it says so on every start.
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
  if (role === "coordinator" && !config.TQ_WORKER_TOKEN && !config.TQ_TLS_CLIENT_CA) {
    missing.push("a worker token (TQ_WORKER_TOKEN) or mutual TLS (TQ_TLS_CLIENT_CA)");
  }
  if (missing.length === 0) return;
  if (config.TQ_INSECURE) {
    log.warn(
      { host: config.TQ_HOST, missing },
      `INSECURE: the ${role} listens on ${config.TQ_HOST} without ${missing.join(" or ")}; anyone who can reach it can run commands`,
    );
    return;
  }
  throw new ConfigError(
    `the ${role} would listen on ${config.TQ_HOST} (beyond loopback) without ${missing.join(" and ")}; ` +
      "configure them, bind TQ_HOST=127.0.0.1, or set TQ_INSECURE=true to run unprotected",
  );
}
