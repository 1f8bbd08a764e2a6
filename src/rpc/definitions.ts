// grpc-js service definitions derived from the protobuf-es service descriptors in src/gen,
// so the .proto files stay the one source of the wire format (no second code generator).
import { create, fromBinary, isMessage, toBinary, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
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

/** Accepts a message or a plain init object of its schema (as a grpc-js caller writes it). */
function serialize(schema: DescMessage, message: unknown): Buffer {
  const value = isMessage(message, schema) ? message : create(schema, message as never);
  return Buffer.from(toBinary(schema, value));
}

/** The grpc-js ServiceDefinition of a generated service, keyed by the methods' local names. */
export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  return Object.fromEntries(service.methods.map((method) => [method.localName, methodDefinition(service, method)]));
}

/** A grpc-js client constructor for a generated service. */
export function clientConstructor(service: DescService): grpc.ServiceClientConstructor {
  return grpc.makeGenericClientConstructor(serviceDefinition(service), service.name);
}
