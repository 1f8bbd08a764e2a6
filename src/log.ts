// Structured JSON logs on stdout (pino). One logger per role, children per part.
import pino from "pino";
import type { Config } from "./config";

export type Logger = pino.Logger;

export function createLogger(role: string, level: Config["TQ_LOG_LEVEL"]): Logger {
  return pino({ level, base: { role }, timestamp: pino.stdTimeFunctions.isoTime });
}

/** A logger that drops everything, for tests and library use. */
export const silentLogger: Logger = pino({ level: "silent" });
