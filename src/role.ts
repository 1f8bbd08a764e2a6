// What every role's main does around its parts: read the configuration, log, stop cleanly
// on SIGTERM/SIGINT (drain once, exit 0; a second Ctrl+C stops at once with 130: see
// stop-signals.ts), and exit non-zero with a clear message when start-up fails.
import { type Config, ConfigError, loadConfig } from "./config";
import { createLogger, type Logger } from "./log";
import { StopSignals } from "./stop-signals";

export interface Running {
  stop(): Promise<void>;
  /** Called, synchronously, just before the process exits without finishing stop(). */
  abort?(): void;
}

export async function runRole(role: string, start: (config: Config, log: Logger) => Promise<Running>): Promise<void> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (error) {
    console.error(`${role}: ${error instanceof ConfigError ? error.message : String(error)}`);
    process.exit(2);
  }
  const log = createLogger(role, config.TQ_LOG_LEVEL);
  // Signals are handled from the start: one that arrives while the role is still starting
  // stops it as soon as it has started.
  let started: Promise<Running> | null = null;
  let running: Running | null = null;
  const stop = async () => {
    try {
      await (await started)?.stop();
      process.exit(0);
    } catch (error) {
      log.error({ err: error }, "stopping failed");
      process.exit(1);
    }
  };
  const signals = new StopSignals({
    stop: (signal) => {
      log.info({ event: "role.stopping", signal }, "stopping");
      void stop();
    },
    again: (signal) => log.info({ event: "role.stopping_again", signal }, "stopping already: the drain goes on"),
    armed: () => log.info({ event: "role.stop_armed" }, "stopping: interrupt again (Ctrl+C) to stop now without drain"),
    now: () => {
      log.warn({ event: "role.stopping_now", signal: "SIGINT" }, "second interrupt: stopping now without drain");
      running?.abort?.();
      process.exit(130);
    },
  });
  process.on("SIGTERM", () => signals.receive("SIGTERM"));
  process.on("SIGINT", () => signals.receive("SIGINT"));
  started = start(config, log);
  try {
    running = await started;
  } catch (error) {
    log.fatal({ err: error }, `${role} failed to start`);
    console.error(`${role}: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  }
}
