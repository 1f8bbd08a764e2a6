// grpc-js service definitions derived from the protobuf-es service descriptors in src/gen,
// so the .proto files stay the one source of the wire format (no second code generator).
import { create, type DescMessage, type DescMethod, type DescService, fromBinary, isMessage, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";

function methodDefinition(service: DescService, method: DescMethod): grpc.MethodDefinition<unknown, unknown> {
  const clientStreams = method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming";
  const serverStreams = method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming";
  return {
    path: `/${service.typeName}/${method.name}`,
    requestStream: clientStreams,
    responseStream: serverStreams,
    // protobuf-es messages are plain objects typed by their schema; the casts are the
    // boundary between grpc-js's untyped bytes and those types.
    requestSerialize: (message) => serialize(method.input, message),
    requestDeserialize: (bytes: Buffer) => fromBinary(method.input, bytes),
    responseSerialize: (message) => serialize(method.output, message),
    responseDeserialize: (bytes: Buffer) => fromBinary(method.output, bytes),
    originalName: method.localName,
  };
}

/**
 * Accepts a message or a plain init object of its schema (as a grpc-js caller writes it), or
 * the bytes of one already encoded (a batch of the worker stream, src/rpc/batch.ts).
 */
function serialize(schema: DescMessage, message: unknown): Buffer {
  const encoded =
    message instanceof Uint8Array
      ? message
      : toBinary(schema, isMessage(message, schema) ? message : create(schema, message as never));
  // A view of the encoded bytes, not a copy of them.
  return Buffer.from(encoded.buffer, encoded.byteOffset, encoded.byteLength);
}

/** The grpc-js ServiceDefinition of a generated service, keyed by the methods' local names. */
export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  return Object.fromEntries(service.methods.map((method) => [method.localName, methodDefinition(service, method)]));
}

/** A grpc-js client constructor for a generated service. */
export function clientConstructor(service: DescService): grpc.ServiceClientConstructor {
  return grpc.makeGenericClientConstructor(serviceDefinition(service), service.name);
}

/**
 * What a server's request deserializer yields for bytes that are not a valid message. grpc-js
 * would answer a throwing deserializer with INTERNAL; bad input is the client's mistake, so
 * handlers answer INVALID_ARGUMENT instead (see guardMalformed).
 */
export class MalformedMessage {
  constructor(readonly reason: string) {}
}

/** The ServiceDefinition for serving: malformed requests arrive as MalformedMessage. */
export function serverDefinition(service: DescService): grpc.ServiceDefinition {
  return Object.fromEntries(
    service.methods.map((method) => {
      const definition = methodDefinition(service, method);
      return [
        method.localName,
        {
          ...definition,
          requestDeserialize: (bytes: Buffer) => {
            try {
              return fromBinary(method.input, bytes);
            } catch (error) {
              return new MalformedMessage(error instanceof Error ? error.message : String(error));
            }
          },
        },
      ];
    }),
  );
}

const malformedStatus = (message: MalformedMessage) => ({
  code: grpc.status.INVALID_ARGUMENT,
  details: `malformed request message: ${message.reason}`,
});

/**
 * Wraps unary and server-streaming handlers so that a malformed request is answered
 * INVALID_ARGUMENT before the handler sees it. Streaming requests (the worker stream) are
 * checked by their handler, message by message.
 */
export function guardMalformed(
  service: DescService,
  implementation: grpc.UntypedServiceImplementation,
): grpc.UntypedServiceImplementation {
  const guarded: grpc.UntypedServiceImplementation = {};
  for (const method of service.methods) {
    const handler = implementation[method.localName];
    if (!handler) continue;
    if (method.methodKind === "unary") {
      const unary = handler as grpc.handleUnaryCall<unknown, unknown>;
      guarded[method.localName] = ((call, callback) =>
        call.request instanceof MalformedMessage
          ? callback(malformedStatus(call.request))
          : unary(call, callback)) as grpc.handleUnaryCall<unknown, unknown>;
    } else if (method.methodKind === "server_streaming") {
      const streaming = handler as grpc.handleServerStreamingCall<unknown, unknown>;
      guarded[method.localName] = ((call) =>
        call.request instanceof MalformedMessage
          ? call.emit("error", Object.assign(new Error(), malformedStatus(call.request)))
          : streaming(call)) as grpc.handleServerStreamingCall<unknown, unknown>;
    } else {
      guarded[method.localName] = handler;
    }
  }
  return guarded;
}
