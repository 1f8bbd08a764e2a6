// The worker stream's protocol version and features: what a worker and a coordinator of
// different builds agree on at Hello, so that during a rolling upgrade (or a rollback) neither
// sends the other something it would misread.
//
// A version counts changes a peer cannot ignore: raise PROTOCOL_VERSION when a message's meaning
// changes for someone who does not know the change, and OLDEST_SERVED_PROTOCOL when this build
// stops serving the old meaning. A behaviour a peer may or may not have (one that an older peer
// ignores harmlessly when it is not relied on) is a feature instead: the coordinator uses it only
// with a worker that names it in Hello. Workers from before versions were announced send
// neither field: they are protocol 0 with no features.

/** The protocol this build speaks. */
export const PROTOCOL_VERSION = 1;

/**
 * The oldest protocol this build still speaks: a coordinator serves workers from here up, and a
 * worker says so in Hello (`min_protocol_version`) for a coordinator older than itself.
 */
export const OLDEST_SERVED_PROTOCOL = 0;

/** What each feature promises, in words; the keys are what travels in Hello and Welcome. */
export const FEATURE_MEANINGS = {
  /**
   * The worker waits `Assign.start_in_ms` from receipt before it starts the command (on its
   * monotonic clock). Without it a coordinator hands the worker only tasks already due: a worker
   * that ignores start_in_ms would start an early hand-over before its time.
   */
  start_in_ms: "waits Assign.start_in_ms after receipt before starting the command",
  /**
   * The worker counts each attempt's lease from the renewals the coordinator confirms
   * (LeaseConfirmation, numbered after the worker's Hello or Heartbeat) and stops the attempt
   * itself a margin before it runs out; the coordinator sends confirmations only to a worker
   * that names it (src/task/lease.ts, src/worker/lease-fence.ts).
   */
  lease_confirm: "counts each attempt's lease from confirmed renewals and fences itself before it runs out",
  /**
   * The worker sends running attempts' output as numbered TaskOutput flushes, before their
   * TaskFinished, within Welcome.log_max_bytes; the coordinator stores them (src/db/logs.ts).
   * A worker sends them only to a coordinator whose Welcome names it.
   */
  live_logs: "sends running attempts' output as numbered TaskOutput flushes before their results",
  /**
   * Either side may send the messages it wrote in one turn of its event loop as one
   * CoordinatorBatch or WorkerBatch (src/rpc/batch.ts), which the other handles message by
   * message in order. A coordinator batches only to a worker that names it in Hello, a worker
   * only to a coordinator whose Welcome names it; without it every message goes alone.
   */
  batch: "sends the messages of one event-loop turn as one batch, and reads batches",
} as const;

export type Feature = keyof typeof FEATURE_MEANINGS;

/** Every feature this build implements, on either side. */
export const FEATURES: readonly Feature[] = Object.keys(FEATURE_MEANINGS) as Feature[];

/** What a peer announced (Hello or Welcome). */
export interface PeerProtocol {
  protocolVersion: number;
  /** Zero when the peer did not say (a peer before versions): its own version. */
  minProtocolVersion: number;
  features: readonly string[];
}

/** The protocol a stream speaks once both sides agreed. */
export interface Agreement {
  protocolVersion: number;
  /** The features both sides implement: the only ones either may rely on. */
  features: ReadonlySet<Feature>;
}

/** A coordinator cannot serve a worker: the message names both sides' versions. */
export class ProtocolMismatch extends Error {
  readonly code = "protocol_mismatch";
}

/**
 * Agrees with a worker on the protocol of its stream, or throws ProtocolMismatch naming both
 * versions. `served` is this coordinator's range (defaults to this build's).
 */
export function agreeWithWorker(
  worker: PeerProtocol,
  served: { oldest: number; newest: number } = { oldest: OLDEST_SERVED_PROTOCOL, newest: PROTOCOL_VERSION },
): Agreement {
  const workerOldest =
    worker.minProtocolVersion > 0 ? Math.min(worker.minProtocolVersion, worker.protocolVersion) : worker.protocolVersion;
  if (worker.protocolVersion < served.oldest) {
    throw new ProtocolMismatch(
      `worker protocol ${worker.protocolVersion} is too old: this coordinator speaks protocols ${served.oldest} to ${served.newest}; upgrade the worker`,
    );
  }
  if (workerOldest > served.newest) {
    throw new ProtocolMismatch(
      `worker protocol ${worker.protocolVersion} (oldest ${workerOldest}) is too new: this coordinator speaks protocols ${served.oldest} to ${served.newest}; upgrade the coordinator first`,
    );
  }
  const known = new Set<string>(FEATURES);
  const features = new Set(worker.features.filter((f): f is Feature => known.has(f)));
  return { protocolVersion: Math.min(worker.protocolVersion, served.newest), features };
}
