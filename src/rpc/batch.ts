// One message per batch on the worker stream (feature `batch`, src/rpc/protocol.ts): what one
// side writes to the other within one turn of its event loop (the Assigns of a dispatch pass,
// the Acks of a group commit, the Started and Finished reports ready at once) goes out as one
// WorkerBatch or CoordinatorBatch, so that the stream costs one gRPC frame, one socket write
// and one decode per batch rather than per message. The batch is written within the turn, never
// after a timer: batching adds no delay a peer could see beyond the rest of the turn's own work.
// Where a side's messages come from one synchronous loop (a coordinator's dispatch pass, its Acks
// after a commit) the end of that loop's microtasks is enough ("microtask"); a worker's reports
// come from the separate callbacks of processes that exited in the same turn, which only the
// turn's end gathers ("turn", setImmediate).
//
// Each message is encoded once, as it is queued, and the batch is put together from those bytes
// (a batch's encoding is its messages' encodings, each behind a tag and a length), so that a
// batch is cut to its byte bound exactly and nothing is encoded twice. grpc-js passes the bytes
// through (src/rpc/definitions.ts).
import { type DescMessage, type MessageShape, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import type { CoordinatorMessage, WorkerMessage } from "../gen/taskqueue/v1/worker_service_pb";

/** `batch` in both WorkerMessage and CoordinatorMessage (proto/taskqueue/v1/worker_service.proto). */
const BATCH_FIELD = 500;
/** `messages` in WorkerBatch and CoordinatorBatch. */
const MESSAGES_FIELD = 1;
/** A tag and a length prefix (at most 2 + 5 bytes) per message, and the batch's own. */
const FRAMING_BYTES = 8;

/**
 * The most bytes one batch carries, well within any receive limit a peer can set (4 MiB by
 * default, TQ_GRPC_MAX_MESSAGE_BYTES no less than 2 MiB). A message bigger than
 * this goes alone, as it would without batching.
 */
export const BATCH_MAX_BYTES = 256 * 1024;

/** Queues one stream's messages and writes those of one turn as one batch. */
export class StreamBatcher<Desc extends DescMessage> {
  private queued: Uint8Array[] = [];
  private bytes = FRAMING_BYTES;
  private scheduled = false;

  /**
   * `write` puts encoded bytes on the stream (a single message's, or a batch's); it must drop
   * them once the stream has ended. `maxBytes` bounds a batch (defaults to BATCH_MAX_BYTES).
   * `until` says when a batch is written: once the current microtasks are done, or at the end
   * of the event-loop turn (the default).
   */
  constructor(
    private readonly schema: Desc,
    private readonly write: (encoded: Uint8Array) => void,
    private readonly maxBytes = BATCH_MAX_BYTES,
    private readonly until: "microtask" | "turn" = "turn",
  ) {}

  /** Queues a message for the end of this turn; messages keep the order they were pushed in. */
  push(message: MessageShape<Desc>): void {
    const encoded = toBinary(this.schema, message);
    if (this.queued.length > 0 && this.bytes + encoded.length + FRAMING_BYTES > this.maxBytes) this.flush();
    this.queued.push(encoded);
    this.bytes += encoded.length + FRAMING_BYTES;
    if (!this.scheduled) {
      this.scheduled = true;
      if (this.until === "microtask") queueMicrotask(this.scheduledFlush);
      else setImmediate(this.scheduledFlush);
    }
  }

  /** Writes what is queued now: before the stream is ended from this side, so that nothing queued is lost. */
  flush(): void {
    const queued = this.queued;
    if (queued.length === 0) return;
    this.queued = [];
    this.bytes = FRAMING_BYTES;
    // One message alone travels as itself: the same bytes an unbatched peer would send.
    if (queued.length === 1) {
      this.write(queued[0]!);
      return;
    }
    const writer = new BinaryWriter().tag(BATCH_FIELD, WireType.LengthDelimited).fork();
    for (const encoded of queued) writer.tag(MESSAGES_FIELD, WireType.LengthDelimited).bytes(encoded);
    this.write(writer.join().finish());
  }

  private readonly scheduledFlush = (): void => {
    this.scheduled = false;
    this.flush();
  };
}

/**
 * The messages a received message carries, in order: a batch's, or the message itself. A batch
 * inside a batch is left in the list for the receiver to refuse (it is never sent).
 */
export function unbatch(message: CoordinatorMessage): CoordinatorMessage[];
export function unbatch(message: WorkerMessage): WorkerMessage[];
export function unbatch(message: CoordinatorMessage | WorkerMessage): (CoordinatorMessage | WorkerMessage)[] {
  return message.payload.case === "batch" ? message.payload.value.messages : [message];
}
