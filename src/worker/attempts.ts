// The attempts this worker holds, from their Assign until their result goes to the reporter.
// An attempt handed over early (Assign.start_in_ms) first waits for its start time; one stopped
// while it waits never starts. A running attempt is stopped through its process group and
// reports itself once the group has exited.

import { DatabaseClock } from "../db/clock";
import type { Assign, TaskRef } from "../gen/taskqueue/v1/worker_service_pb";
import { type Logger, taskFields } from "../log";
import { limitsFromProto } from "../rpc/convert";
import { attemptKey, type LossCause } from "../task/attempt";
import type { Tracing } from "../trace/tracing";
import { type Execution, execute, notRun, type RunResult, type RunSpec } from "./executor";
import type { TaskIdentity } from "./identity";
import type { Confinement, Limiter } from "./limits";
import { type LogFlush, LogStreamer, type LogStreamerOptions } from "./log-streamer";
import { HOST_GATE_WINDOW_MS, type HostGates, StartGate } from "./start-gate";

/** What the attempts tell the coordinator (through the reporter). */
export interface AttemptEvents {
  /** The command was spawned. */
  started(ref: TaskRef, pid: number, startedAt: Date): void;
  /**
   * The command ended; `stopReason` is why it was stopped (told to, or handed back), if it
   * was. `interrupted`: it was handed back for the worker's own reasons (drain), which do not
   * count against the task's attempts.
   */
  finished(ref: TaskRef, result: RunResult, stopReason: string | undefined, interrupted: boolean): void;
  /** A flush of the running command's output (live logs); the final one comes before finished. */
  output?(ref: TaskRef, flush: LogFlush): void;
  /** The attempt ended before its command started: cancelled, or handed back while it waited. */
  notStarted(ref: TaskRef, outcome: "cancelled" | "abandoned", why: string, interrupted: boolean): void;
}

export interface AttemptsOptions {
  log: Logger;
  killGraceMs: number;
  maxOutputBytes: number;
  /** Environment the tasks inherit; the executor strips the worker's own settings from it. */
  baseEnv: Record<string, string | undefined>;
  /**
   * One user per slot (src/worker/identity.ts): an attempt runs as a user no other held attempt
   * has. Unset: every attempt runs as the worker.
   */
  identities?: readonly TaskIdentity[];
  events: AttemptEvents;
  /** Who holds the attempts now, for their log lines (the worker's id, its coordinator). */
  identity?: () => { workerId: string; coordinatorId: string | null };
  /** Limits each attempt (src/worker/limits.ts); none: plain `sh -c`. */
  limiter?: Limiter;
  /** Starts a `run` span per traced attempt (src/trace); absent or null: off. */
  tracing?: Tracing | null;
  /**
   * Asked as an attempt is about to start (at once, or when its start time came): start it,
   * hold it (parked until resumeParked decides), or refuse it (handed back, never started).
   * The worker's lease rules (src/worker/worker.ts). Unset: start.
   */
  gate?: (key: string, receivedAt: number) => "start" | "hold" | "refuse";
  /**
   * How to stream the output of an attempt about to start (live logs), or null not to: asked
   * once per attempt, since it depends on the coordinator of the moment. Unset: not streamed.
   */
  logStreaming?: () => LogStreamerOptions | null;
  /** Hears that an attempt is no longer held (the worker forgets its lease). */
  onForget?: (key: string) => void;
  /**
   * Arm early hand-overs (spawn each while it waits, held before its command) so that the
   * start time only releases it. Defaults to true; false spawns at the start time (a bench's
   * comparison).
   */
  armEarly?: boolean;
  /**
   * The host gates of this worker's user (src/worker/start-gate.ts): attempts due at one time
   * wait on one FIFO with every other worker's of the host, and the first worker at the instant
   * lets them all go. Unset or null: each worker's gates are its own.
   */
  hostGates?: HostGates | null;
  /**
   * Whether the attempt's lease, by the worker's count, still holds at `until` (performance.now()
   * ms): an attempt goes on a host gate only if it outlasts the gate's last possible opening.
   * Unset: every lease is trusted (no host gate is used without it).
   */
  leaseHolds?: (key: string, until: number) => boolean;
  /** Called, synchronously, whenever what `processes()` returns changed (the watchdog is told at once). */
  changed?: () => void;
  /**
   * Runs an attempt's command. Defaults to the executor (src/worker/executor.ts); the benches'
   * no-op fleet (bench/support/noop-fleet.ts) passes one that reports exit 0 at once.
   */
  execute?: (spec: RunSpec) => Execution;
}

/** One held attempt as the worker's watchdog must know it, to stop it if the worker dies. */
export interface HeldProcess {
  taskId: string;
  attempt: number;
  /** The process group it runs in (the leader's pid; an early hand-over's is spawned on receipt, held before its command); null before the spawn. */
  pgid: number | null;
  /** Its cgroup's cgroup.procs files, for what left the group. */
  cgroupProcs: readonly string[];
}

/** Why the worker refused to start an attempt: its lease could not be trusted. */
export const REFUSED_UNTRUSTED = "the worker could not trust the assignment's lease (it stalled or was cut off); not started";

interface HeldAttempt {
  assign: Assign;
  /** null while the attempt waits for its start time. */
  execution: Execution | null;
  /** The start instant it waits for (a key of Attempts.starts), while it waits. */
  startBucket?: string;
  /** The start gate its armed shell waits on, until it is released or gone. */
  gate?: StartGate;
  /** Why it was stopped (the coordinator's Cancel, or our hand-back), if it was. */
  stopReason?: string;
  /** The slot user it runs as, held from Assign until the attempt is forgotten. */
  identity?: TaskIdentity;
  /** Why we handed it back, if we did: interrupted (drain) or lost (our lease lapsed). */
  handBack?: LossCause;
  /** performance.now() when its Assign was taken. */
  receivedAt: number;
  /** Held back by the gate before its start, until resumeParked. */
  parked?: boolean;
  /**
   * Made while an early hand-over waits for its start time (its cgroup and limits), so that at
   * the start only the spawn is left to do; released if the attempt never starts.
   */
  confinement?: Confinement;
  /**
   * An early hand-over's process, spawned on receipt and held before its command
   * (RunSpec.armed) until the start time releases it: the start is then a pipe write, not a
   * spawn serialised behind every other attempt due at the same instant.
   */
  armed?: Execution;
  /** Stopped before its start: the armed process is being killed, and then it is reported. */
  disarming?: boolean;
  /** performance.now() at which an early hand-over starts. */
  startAt?: number;
  /** Tells that an armed attempt started, once (deferred past the release). */
  tellStarted?: () => void;
  /** The last execution spawned for it, and the live-log streamer of that spawn (if streamed). */
  spawned?: Execution;
  streamer?: LogStreamer;
}

/**
 * An early hand-over is armed (spawned ahead) only while every start is at least this far off,
 * plus what a spawn has lately taken: a spawn holds the event loop, and a start due meanwhile
 * would wait for it.
 */
export const ARM_MARGIN_MS = 5;

/**
 * The timer of a start instant with at least START_SPIN_MIN attempts fires this long before it,
 * and the rest is spun out: the worker is on a core when the instant comes, rather than waking
 * then with everything else released at that instant (other workers' shells). At most this
 * much CPU per such instant: a quarter of a ms per attempt or less.
 */
export const START_SPIN_MS = 2;
export const START_SPIN_MIN = 8;

/**
 * An attempt goes on a host gate only if its lease holds this long past the gate's last
 * possible opening (its instant plus HOST_GATE_WINDOW_MS): the other workers place the instant
 * by their own reading of the database's clock, within a few ms of this worker's.
 */
export const HOST_GATE_LEASE_SLACK_MS = 1000;

export class Attempts {
  /** Waiting and running attempts, by attempt key. */
  private readonly held = new Map<string, HeldAttempt>();
  private readonly emptyWaiters: Array<() => void> = [];
  /** Slot users no held attempt has, lowest uid last (popped first). */
  private readonly freeIdentities: TaskIdentity[];
  /** Early hand-overs waiting to be armed, one per turn of the event loop (so start timers come first). */
  private readonly toArm: string[] = [];
  private arming: ReturnType<typeof setTimeout> | null = null;
  /**
   * Attempts waiting for their start, by start instant (scheduleStart): when it is (at,
   * performance.now() ms, whole), who waits for it, and its one timer.
   */
  private readonly starts = new Map<
    string,
    { at: number; keys: Set<string>; timer: ReturnType<typeof setTimeout>; gate?: StartGate | null }
  >();
  /** The database's clock as the early hand-overs' Assigns tell it (src/db/clock.ts). */
  private readonly databaseClock = new DatabaseClock(null);
  /** A recent armed spawn's cost, in ms (moving average): how close to a start none begins. */
  private spawnCostMs = ARM_MARGIN_MS;

  constructor(private readonly options: AttemptsOptions) {
    this.freeIdentities = [...(options.identities ?? [])].reverse();
  }

  /** How many attempts are held, waiting or running. */
  get size(): number {
    return this.held.size;
  }

  holds(ref: TaskRef): boolean {
    return this.held.has(attemptKey(ref.taskId, ref.attempt));
  }

  refs(): TaskRef[] {
    return [...this.held.values()].map(({ assign }) => assign.ref!);
  }

  /** Every held attempt with its process group and cgroup (for the watchdog). */
  processes(): HeldProcess[] {
    return [...this.held.values()].map(({ assign, execution, armed }) => ({
      taskId: assign.ref!.taskId,
      attempt: assign.ref!.attempt,
      pgid: (execution ?? armed)?.pid ?? null,
      cgroupProcs: (execution ?? armed)?.cgroupProcs ?? [],
    }));
  }

  /** Takes on an assigned attempt (it has a ref): runs it now, or once its start time has come. */
  /** `arrivedAt`: performance.now() when its message came (its start time counts from there). */
  take(assign: Assign, arrivedAt = performance.now()): void {
    const k = attemptKey(assign.ref!.taskId, assign.ref!.attempt);
    const attempt: HeldAttempt = { assign, execution: null, identity: this.freeIdentities.pop(), receivedAt: performance.now() };
    this.held.set(k, attempt);
    this.options.changed?.();
    if (assign.startInMs <= 0) {
      this.launch(k, attempt);
      return;
    }
    // Early hand-over: wait out the time until the task is due. Checked against the
    // monotonic clock, as a timer may fire a fraction of a millisecond early.
    let startAt = arrivedAt + assign.startInMs;
    if (assign.dueAtMs > 0) {
      // The Assign says the database's clock read at least due_at_ms - start_in_ms when it was
      // sent, so at least that at its arrival: the tightest of these readings places the due
      // time on this clock, never early, and alike for every attempt (and worker) due then.
      this.databaseClock.record(assign.dueAtMs - assign.startInMs, arrivedAt);
      startAt = Math.min(startAt, this.databaseClock.toLocal(assign.dueAtMs) ?? startAt);
    }
    // Meanwhile, what the start does not need to do at its time: the cgroup (a few ms of
    // cgroupfs writes each, serialised with every other attempt due at the same instant).
    attempt.startAt = startAt;
    if (this.options.armEarly !== false && !this.options.execute && (!this.options.identities || attempt.identity))
      this.queueArming(k);
    this.scheduleStart(k, attempt, startAt);
  }

  /**
   * Waits for the start: one timer per start instant, so that every attempt due at one instant
   * starts in one callback with nothing in between. (A timer each let the exits and output of
   * the first ones released run between the releases of the rest, and the last of 50 due at
   * once started tens of ms late.) Attempts with one due time (Assign.due_at_ms) share an
   * instant: the earliest of their own counts, each of which is never early, whatever batch
   * brought them; without one, the instant is the attempt's own count, in whole ms rounded up.
   */
  private scheduleStart(k: string, attempt: HeldAttempt, startAt: number): void {
    const dueAtMs = attempt.assign.dueAtMs;
    const key = dueAtMs > 0 ? `due ${dueAtMs}` : `at ${Math.ceil(startAt)}`;
    const at = Math.ceil(startAt);
    attempt.startBucket = key;
    const bucket = this.starts.get(key);
    if (!bucket) {
      this.starts.set(key, { at, keys: new Set([k]), timer: this.startTimer(key, at) });
      return;
    }
    bucket.keys.add(k);
    // Earlier now, or now many enough to spin for: the timer again.
    if (at < bucket.at || bucket.keys.size === START_SPIN_MIN) {
      clearTimeout(bucket.timer);
      bucket.at = Math.min(bucket.at, at);
      bucket.timer = this.startTimer(key, bucket.at, bucket.keys.size >= START_SPIN_MIN);
    }
  }

  private startTimer(key: string, at: number, spin = false): ReturnType<typeof setTimeout> {
    return setTimeout(() => this.startDue(key), Math.max(0, at - (spin ? START_SPIN_MS : 0) - performance.now()));
  }

  /** A start instant's timer: every attempt still waiting for it starts, released ones first. */
  private startDue(key: string): void {
    const bucket = this.starts.get(key);
    if (!bucket) return;
    // The timer fires START_SPIN_MS ahead and the instant itself is waited out here, on the
    // monotonic clock: a timer may fire late, and a worker woken exactly at the instant shares
    // the cores with whatever else is released then (the other workers' shells).
    const spin = bucket.keys.size >= START_SPIN_MIN;
    if (bucket.at - performance.now() > (spin ? START_SPIN_MS : 0)) {
      bucket.timer = this.startTimer(key, bucket.at, spin);
      return;
    }
    while (performance.now() < bucket.at) {
      // spin: at most START_SPIN_MS
    }
    this.starts.delete(key);
    if (bucket.gate) this.retireGate(bucket.gate);
    const due: [string, HeldAttempt][] = [];
    for (const k of bucket.keys) {
      const attempt = this.held.get(k);
      if (attempt?.startBucket !== key) continue;
      attempt.startBucket = undefined;
      due.push([k, attempt]);
    }
    // First what lets the commands run, and nothing else: the armed shells on the gate are
    // released and the gate written once. Their exec'ing takes both cores at once on a small
    // host, and whatever this turn did before the write would wait behind them.
    const gate = bucket.gate ?? null;
    const admitted: [string, HeldAttempt][] = [];
    // A host gate's instant is decided once for the host, under its lock (src/worker/start-gate.ts).
    const opening = gate?.isHost ? gate.enter() : null;
    let at: number;
    let shut: boolean;
    // Held from here until the instant is decided (the lock is left below).
    try {
      // Opened already (by another worker): our shells on it went then, and run. (Each went on
      // it only with a lease that outlasts the gate's last opening, so it was let go within its
      // lease, as if we had let it go just then.)
      const openedAt = opening?.openedAt ?? null;
      // Given up, or ours to give up (past its window, or its lock not had): our shells on it
      // are killed and spawned afresh (begin).
      shut =
        gate?.isHost === true &&
        openedAt === null &&
        (opening === null || opening.givenUp || performance.now() - bucket.at > HOST_GATE_WINDOW_MS);
      for (const [k, attempt] of due) {
        if (!attempt.armed) continue;
        if (openedAt !== null && attempt.gate === gate) admitted.push([k, attempt]);
        else if (this.admit(k, attempt, false)) admitted.push([k, attempt]);
      }
      // The start time of every shell the write lets go: taken just before it.
      at = openedAt ?? Date.now();
    } catch (error) {
      opening?.leave();
      throw error;
    }
    const startedAt = new Date(at);
    const onGate = (attempt: HeldAttempt) => gate !== null && attempt.gate === gate && !shut;
    let released: (readonly [string, HeldAttempt, boolean])[];
    if (opening) {
      // A host gate: any worker may have written it already, so a shell that ended took its
      // line and ran (release(at, true)).
      try {
        if (shut) opening.giveUp();
        else opening.open(at);
      } finally {
        opening.leave();
      }
      released = admitted.map(
        ([k, attempt]) => [k, attempt, onGate(attempt) && attempt.armed!.release(startedAt, true)] as const,
      );
    } else {
      // Our own gate, written by us only: released before the write, so that a shell that
      // ended before it (it never ran) is spawned afresh.
      released = admitted.map(([k, attempt]) => [k, attempt, onGate(attempt) && attempt.armed!.release(startedAt)] as const);
      if (!shut) gate?.open();
    }
    // Then the rest of their starts (spans, Started, results), then the spawns of the ones not armed.
    for (const [k, attempt, onGate] of released) this.begin(k, attempt, onGate);
    for (const [k, attempt] of due) if (!attempt.execution && this.held.get(k) === attempt) this.launch(k, attempt);
  }

  /**
   * The start gate of the attempt's start instant (made on first use): the host gate of its due
   * time where there are host gates and its lease outlasts the gate's window, a gate of this
   * worker's own otherwise. null: none here (armed on a pipe of its own); "unarmed": the
   * instant's gate is a host gate this attempt's lease does not outlast (spawned at its start).
   */
  private gateFor(k: string, attempt: HeldAttempt): StartGate | null | "unarmed" {
    const bucket = attempt.startBucket === undefined ? undefined : this.starts.get(attempt.startBucket);
    if (!bucket) return null;
    const dueAtMs = attempt.assign.dueAtMs;
    const hostable =
      this.options.hostGates != null &&
      this.options.leaseHolds !== undefined &&
      dueAtMs > 0 &&
      this.options.leaseHolds(k, bucket.at + HOST_GATE_WINDOW_MS + HOST_GATE_LEASE_SLACK_MS);
    if (bucket.gate === undefined) {
      bucket.gate = (hostable ? this.options.hostGates!.gate(dueAtMs) : null) ?? StartGate.create();
    }
    if (bucket.gate?.isHost && !hostable) return "unarmed";
    return bucket.gate;
  }

  /** The attempt no longer waits on its gate (released, stopped, or gone). */
  private leaveGate(k: string, attempt: HeldAttempt): void {
    const gate = attempt.gate;
    if (!gate) return;
    attempt.gate = undefined;
    gate.members.delete(k);
    this.closeIfDone(gate);
  }

  /** Gates whose start instant has passed (or was given up): closed once no shell waits on them. */
  private readonly retiredGates = new WeakSet<StartGate>();

  private retireGate(gate: StartGate): void {
    this.retiredGates.add(gate);
    this.closeIfDone(gate);
  }

  private closeIfDone(gate: StartGate): void {
    if (gate.members.size === 0 && this.retiredGates.has(gate)) gate.close();
  }

  /** An attempt stops waiting for its start (it is stopped before it). */
  private unscheduleStart(k: string, attempt: HeldAttempt): void {
    const key = attempt.startBucket;
    if (key === undefined) return;
    attempt.startBucket = undefined;
    const bucket = this.starts.get(key);
    if (!bucket) return;
    bucket.keys.delete(k);
    if (bucket.keys.size === 0) {
      clearTimeout(bucket.timer);
      this.starts.delete(key);
      if (bucket.gate) this.retireGate(bucket.gate);
    }
  }

  /** The coordinator's Cancel: stops the attempt, if we hold it. */
  cancel(ref: TaskRef, reason: string): void {
    const k = attemptKey(ref.taskId, ref.attempt);
    const attempt = this.held.get(k);
    if (!attempt) return;
    this.options.log.info({ ...this.fields(ref), reason }, "stopping task");
    attempt.stopReason ??= reason || "cancelled";
    this.stop(k, attempt, "cancelled", attempt.stopReason);
  }

  /**
   * Hands back every attempt still waiting for its start time (we take no new work).
   * `cause`: interrupted (drain) or lost (our lease lapsed), as the coordinator is told.
   */
  releaseWaiting(why: string, cause: LossCause): void {
    for (const [k, attempt] of this.held) if (!attempt.execution) this.handBack(k, attempt, why, cause);
  }

  /** Hands back every attempt, waiting or running: running ones once their process group has exited. */
  abandonAll(why: string, cause: LossCause): void {
    for (const [k, attempt] of this.held) this.handBack(k, attempt, why, cause);
  }

  /**
   * Fences an attempt whose lease is about to run out: a running one is stopped (TERM, then
   * KILL after `graceMs` at most) and handed back as lost; one not started never starts.
   * Returns whether it was held.
   */
  fence(key: string, why: string, graceMs: number): boolean {
    const attempt = this.held.get(key);
    if (!attempt) return false;
    // One that never started did not use up an attempt.
    attempt.handBack ??= attempt.execution ? "lost" : "interrupted";
    attempt.stopReason ??= why;
    this.stop(key, attempt, "abandoned", attempt.stopReason, graceMs);
    return true;
  }

  /** Attempts held back by the gate, with when their Assign was taken. */
  parked(): { key: string; ref: TaskRef; receivedAt: number }[] {
    const out: { key: string; ref: TaskRef; receivedAt: number }[] = [];
    for (const [key, attempt] of this.held)
      if (attempt.parked) out.push({ key, ref: attempt.assign.ref!, receivedAt: attempt.receivedAt });
    return out;
  }

  /** Starts a parked attempt, or refuses it (handed back, interrupted: it never ran). */
  resumeParked(key: string, decision: "start" | "refuse"): void {
    const attempt = this.held.get(key);
    if (!attempt?.parked) return;
    attempt.parked = false;
    if (decision === "start") this.launch(key, attempt, true);
    else this.handBack(key, attempt, REFUSED_UNTRUSTED, "interrupted");
  }

  /** Kills every running command's process group at once, without grace: the worker exits now. */
  killAll(): void {
    for (const attempt of this.held.values()) (attempt.execution ?? attempt.armed)?.kill();
  }

  /** Resolves once no attempt is held. */
  empty(): Promise<void> {
    if (this.held.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.emptyWaiters.push(resolve));
  }

  private launch(k: string, attempt: HeldAttempt, decided = false): void {
    if (this.admit(k, attempt, decided)) this.begin(k, attempt, false);
  }

  /**
   * Whether the attempt may start now, by the lease's trust gate: one held back is parked, one
   * refused is handed back. `decided`: the gate has already said start.
   */
  private admit(k: string, attempt: HeldAttempt, decided: boolean): boolean {
    const gate = decided ? "start" : (this.options.gate?.(k, attempt.receivedAt) ?? "start");
    // The gate may have fenced it meanwhile (its lease ran out as it was asked).
    if (this.held.get(k) !== attempt) return false;
    if (gate === "hold") {
      attempt.parked = true;
      // Parked on a start gate, its shell could take a line meant for another: it is killed
      // now (a kill pending, it can take a line but run nothing), and a fresh one is spawned
      // if it is resumed.
      const armed = attempt.armed;
      if (armed && attempt.gate) {
        attempt.armed = undefined;
        armed.kill();
        this.leaveGate(k, attempt);
      }
      return false;
    }
    if (gate === "refuse") {
      this.handBack(k, attempt, REFUSED_UNTRUSTED, "interrupted");
      return false;
    }
    return true;
  }

  /**
   * Starts an admitted attempt. `released`: its armed shell was released already, on its
   * start gate, by the caller (startDue), who writes the gate once for all of them.
   */
  private begin(k: string, attempt: HeldAttempt, released: boolean): void {
    const { assign } = attempt;
    const ref = assign.ref!;
    // Traced: the run span, a child of the dispatch span, lasts the attempt, and the command's
    // TRACEPARENT names it (so the command's own spans are its children). Not traced here:
    // the dispatch span's traceparent is passed on as it came.
    const run =
      this.options.tracing && assign.traceparent
        ? this.options.tracing.start("run", assign.traceparent, {
            "taskqueue.task_id": ref.taskId,
            "taskqueue.attempt": ref.attempt,
          })
        : null;
    // Armed on receipt: released now. One whose process failed or ended meanwhile never ran
    // the command, and a fresh spawn takes its place (reporting a spawn failure as it is).
    const armed = attempt.armed;
    attempt.armed = undefined;
    // A shell on a start gate goes only with its instant's one write (startDue): one that was
    // not released there is killed, and a fresh spawn takes its place.
    const onGate = attempt.gate !== undefined;
    this.leaveGate(k, attempt);
    const usable = armed && (released || (!onGate && armed.release()));
    if (armed && !usable && onGate) armed.kill();
    const execution = usable ? armed : this.spawn(attempt, false, run?.traceparent);
    const streamer = execution === armed || execution === attempt.spawned ? attempt.streamer : undefined;
    attempt.execution = execution;
    if (execution === armed) {
      // Released: the watchdog knows its group since it was armed (the same pid, the same
      // cgroup). Its report waits until this turn's timers are done, so that the other
      // attempts due at this instant are released first, not after each one's Started.
      const { pid, startedAt } = execution;
      let told = false;
      attempt.tellStarted = () => {
        if (told) return;
        told = true;
        this.options.events.started(ref, pid!, startedAt);
      };
      setImmediate(attempt.tellStarted);
    } else {
      // Before anything is awaited: a worker that dies from here on leaves its watchdog knowing this group.
      this.options.changed?.();
      if (execution.pid !== null) this.options.events.started(ref, execution.pid, execution.startedAt);
    }
    void execution.result.then((result) => {
      // Started is always told before Finished, however quick the command.
      attempt.tellStarted?.();
      run?.end(result.outcome === "exited" && result.exitCode === 0 ? null : `ended ${result.outcome}`, {
        "taskqueue.outcome": result.outcome,
        ...(result.exitCode === null ? {} : { "process.exit.code": result.exitCode }),
      });
      this.forget(k);
      // The pipes are read out: the last of the output goes before the result (one stream, in order).
      streamer?.finish();
      if (result.outcome !== "exited") {
        this.options.log.info(
          { event: "worker.task_stopped", ...this.fields(ref), outcome: result.outcome, task_pid: result.pid },
          "task stopped",
        );
      }
      this.options.events.finished(ref, result, attempt.stopReason, attempt.handBack === "interrupted");
      this.settle();
    });
  }

  private queueArming(k: string): void {
    this.toArm.push(k);
    this.arming ??= setTimeout(() => this.armNext(), 0);
  }

  /**
   * Arms the next queued early hand-over: its cgroup and its process, held before the command,
   * made while it waits. One spawn per timer turn, and none while any start (armed or not) is
   * due within a spawn's time: a spawn holds the event loop, and a start must not wait for it.
   * One whose own start is that close is left to spawn at its start, as it would unarmed.
   */
  private armNext(): void {
    this.arming = null;
    const now = performance.now();
    const margin = ARM_MARGIN_MS + this.spawnCostMs;
    // When the next start instant's callback runs (it may spin out the last START_SPIN_MS).
    let soonest = Number.POSITIVE_INFINITY;
    for (const bucket of this.starts.values()) soonest = Math.min(soonest, bucket.at - START_SPIN_MS);
    for (;;) {
      const k = this.toArm[0];
      if (k === undefined) return;
      const attempt = this.held.get(k);
      const waiting = attempt && !attempt.execution && !attempt.armed && !attempt.disarming && attempt.startBucket !== undefined;
      const startsAt = attempt?.startBucket === undefined ? undefined : this.starts.get(attempt.startBucket)?.at;
      if (!attempt || !waiting || startsAt === undefined || startsAt - START_SPIN_MS - now < margin) {
        this.toArm.shift();
        continue;
      }
      if (soonest - now < margin) {
        // Another start comes first: arm again once it has passed.
        this.arming = setTimeout(() => this.armNext(), Math.max(1, Math.ceil(soonest - now) + 1));
        return;
      }
      this.toArm.shift();
      const before = performance.now();
      attempt.confinement ??= this.confine(attempt);
      const gate = this.gateFor(k, attempt);
      if (gate === "unarmed") continue;
      if (gate) {
        attempt.gate = gate;
        gate.members.add(k);
        gate.add();
      }
      attempt.armed = this.spawn(attempt, true);
      // What a spawn costs here now (a loaded host takes far longer): the margin follows it.
      this.spawnCostMs = 0.7 * this.spawnCostMs + 0.3 * (performance.now() - before);
      // The watchdog learns its process group now: a worker dying from here on leaves none behind.
      this.options.changed?.();
      break;
    }
    if (this.toArm.length > 0) this.arming = setTimeout(() => this.armNext(), 0);
  }

  /**
   * Spawns the attempt's command: now, or armed (held before the command until released). More
   * attempts than slots (the coordinator should never send them): sharing a user would let two
   * tasks read each other's environment, so the extra one fails instead.
   */
  private spawn(attempt: HeldAttempt, armed: boolean, runTraceparent?: string): Execution {
    const { assign } = attempt;
    const ref = assign.ref!;
    if (this.options.identities && !attempt.identity)
      return notRun(`no free slot user: this worker already runs ${this.options.identities.length} tasks`);
    // Traced: the command's TRACEPARENT names the run span (known only at the start; an armed
    // one carries the dispatch span's, its parent).
    const traceparent = runTraceparent ?? assign.traceparent;
    // Live logs: how to stream is asked per spawn (it depends on the coordinator of the moment);
    // an armed shell writes nothing before its release, so its streamer is made with it.
    const streaming = this.options.events.output ? this.options.logStreaming?.() : null;
    const streamer = streaming ? new LogStreamer((flush) => this.options.events.output?.(ref, flush), streaming) : undefined;
    attempt.streamer = streamer;
    const execution = (this.options.execute ?? execute)({
      command: assign.command,
      env: {
        ...assign.env,
        TQ_TASK_ID: ref.taskId,
        TQ_TASK_ATTEMPT: String(ref.attempt),
        ...(traceparent ? { TRACEPARENT: traceparent } : {}),
      },
      cwd: assign.cwd || undefined,
      timeoutMs: assign.timeoutMs,
      killGraceMs: this.options.killGraceMs,
      maxOutputBytes: this.options.maxOutputBytes,
      ...(streamer ? { onOutput: (stream, chunk) => streamer.push(stream, chunk) } : {}),
      baseEnv: this.options.baseEnv,
      user: attempt.identity,
      confinement: this.takeConfinement(attempt) ?? this.confine(attempt),
      armed,
      ...(armed && attempt.gate ? { gate: attempt.gate.readFd, hostGate: attempt.gate.isHost } : {}),
    });
    attempt.spawned = execution;
    return execution;
  }

  /** The attempt's limits as the limiter applies them (a cgroup of its own where it can). */
  private confine(attempt: HeldAttempt): Confinement | undefined {
    const { assign, identity } = attempt;
    return this.options.limiter?.confine(
      assign.limits ? limitsFromProto(assign.limits) : null,
      identity ? { uid: identity.uid, gid: identity.gid } : undefined,
    );
  }

  /** The confinement made ahead, handed to the execution (which releases it from then on). */
  private takeConfinement(attempt: HeldAttempt): Confinement | undefined {
    const confinement = attempt.confinement;
    attempt.confinement = undefined;
    return confinement;
  }

  /** The first hand-back decides what the coordinator is told (a drain after a lapse is still a lapse). */
  private handBack(k: string, attempt: HeldAttempt, why: string, cause: LossCause): void {
    attempt.handBack ??= cause;
    attempt.stopReason ??= why;
    this.stop(k, attempt, "abandoned", attempt.stopReason);
  }

  /**
   * Stops an attempt: a running process is stopped and reports itself when it has exited;
   * one still waiting for its start time never starts and is reported at once.
   */
  private stop(k: string, attempt: HeldAttempt, outcome: "cancelled" | "abandoned", why: string, graceMs?: number): void {
    if (attempt.execution) {
      attempt.execution.stop(outcome, graceMs);
      return;
    }
    // Already being stopped before its start: reported once its process is gone.
    if (attempt.disarming) return;
    this.unscheduleStart(k, attempt);
    const armed = attempt.armed;
    if (armed) {
      // Its command never ran, but its process is reported gone only once it is: nothing of
      // an attempt outlives its hand-back.
      attempt.armed = undefined;
      attempt.disarming = true;
      armed.stop(outcome, 0);
      void armed.result.then(() => this.notStarted(k, attempt, outcome, why));
      return;
    }
    this.notStarted(k, attempt, outcome, why);
  }

  /** An attempt that never started (nothing of it runs) is forgotten and reported. */
  private notStarted(k: string, attempt: HeldAttempt, outcome: "cancelled" | "abandoned", why: string): void {
    // Never started: its cgroup, made ahead, holds nothing.
    this.takeConfinement(attempt)?.release();
    this.forget(k);
    this.options.events.notStarted(
      attempt.assign.ref!,
      outcome,
      why,
      outcome === "abandoned" && attempt.handBack === "interrupted",
    );
    this.settle();
  }

  /** The four fields of a task-scoped log line. */
  fields(ref: TaskRef) {
    const identity = this.options.identity?.();
    return taskFields({ taskId: ref.taskId, attempt: ref.attempt, ...identity });
  }

  /** The attempt is no longer held; its slot user is free once nothing of it runs. */
  private forget(k: string): void {
    const held = this.held.get(k);
    if (held) this.leaveGate(k, held);
    const identity = held?.identity;
    this.held.delete(k);
    this.options.onForget?.(k);
    this.options.changed?.();
    if (identity) {
      this.freeIdentities.push(identity);
      this.freeIdentities.sort((a, b) => b.uid - a.uid);
    }
  }

  private settle(): void {
    if (this.held.size === 0) for (const resolve of this.emptyWaiters.splice(0)) resolve();
  }
}
