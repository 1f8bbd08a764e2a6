// How a role reads the signals that stop it. SIGTERM asks for a drain, however often it
// comes: `bun run <role>` forwards every signal it gets to the role, so one sent to the
// process group (what systemd and a terminal's Ctrl+C do) reaches the role twice. Only a
// second interrupt (SIGINT) cuts the drain short; the copy of the first that `bun run`
// forwards arrives within moments, and is the same interrupt.

/** SIGINTs this close to the first are copies of it (Ctrl+C reaches `bun run` and the role). */
export const SAME_INTERRUPT_MS = 500;

export type StopSignal = "SIGTERM" | "SIGINT";

export interface StopHandlers {
  /** The first stop signal: drain and exit. Called once. */
  stop(signal: StopSignal): void;
  /** A repeat that changes nothing: a SIGTERM while stopping, or a copy of the first interrupt. */
  again(signal: StopSignal): void;
  /** From now on a further interrupt is a second one. Called once, after the first interrupt. */
  armed(): void;
  /** A second interrupt: stop now, without draining. */
  now(): void;
}

export class StopSignals {
  private stopping = false;
  private interruptedAt: number | null = null;

  constructor(
    private readonly on: StopHandlers,
    private readonly windowMs = SAME_INTERRUPT_MS,
    private readonly clock: () => number = () => performance.now(),
  ) {}

  receive(signal: StopSignal): void {
    if (signal === "SIGINT") {
      const at = this.clock();
      if (this.interruptedAt === null) {
        this.interruptedAt = at;
        setTimeout(() => this.on.armed(), this.windowMs).unref();
      } else if (at - this.interruptedAt >= this.windowMs) {
        this.on.now();
        return;
      }
    }
    if (this.stopping) {
      this.on.again(signal);
      return;
    }
    this.stopping = true;
    this.on.stop(signal);
  }
}
