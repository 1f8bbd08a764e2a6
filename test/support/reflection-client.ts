// A gRPC client that knows no service of ours in advance, as grpcurl: it learns the services
// and their messages from server reflection, decodes the file descriptors it is sent into a
// protobuf-es registry, and calls methods with JSON in and JSON out. Only the reflection
// protocol itself is known beforehand (@grpc/reflection's own reflection.proto).
import { dirname, join } from "node:path";
import {
  create,
  createFileRegistry,
  type DescMethod,
  type DescService,
  fromBinary,
  fromJson,
  type JsonValue,
  toBinary,
  toJson,
} from "@bufbuild/protobuf";
import { type FileDescriptorProto, FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";

export type ReflectionVersion = "v1" | "v1alpha";

interface ReflectionResponse {
  listServicesResponse?: { service: { name: string }[] };
  fileDescriptorResponse?: { fileDescriptorProto: Buffer[] };
  errorResponse?: { errorCode: number; errorMessage: string };
}

type ReflectionStub = grpc.Client & {
  serverReflectionInfo(): grpc.ClientDuplexStream<object, ReflectionResponse>;
};

const reflectionRoot = join(dirname(require.resolve("@grpc/reflection/package.json")), "build/proto");

function reflectionClient(address: string, version: ReflectionVersion): ReflectionStub {
  const definition = loadSync(`grpc/reflection/${version}/reflection.proto`, { includeDirs: [reflectionRoot] });
  const loaded = grpc.loadPackageDefinition(definition) as unknown as {
    grpc: { reflection: Record<ReflectionVersion, { ServerReflection: grpc.ServiceClientConstructor }> };
  };
  const Client = loaded.grpc.reflection[version].ServerReflection;
  return new Client(address, grpc.credentials.createInsecure()) as unknown as ReflectionStub;
}

export class ReflectionClient {
  private readonly stub: ReflectionStub;
  private readonly channels = new Map<string, grpc.Client>();

  constructor(
    private readonly address: string,
    readonly version: ReflectionVersion = "v1",
  ) {
    this.stub = reflectionClient(address, version);
  }

  close(): void {
    this.stub.close();
    for (const client of this.channels.values()) client.close();
  }

  /** One reflection request on its own stream; a reflection error rejects with its code. */
  private ask(request: object): Promise<ReflectionResponse> {
    return new Promise((resolve, reject) => {
      const stream = this.stub.serverReflectionInfo();
      let answer: ReflectionResponse | null = null;
      stream.on("data", (response: ReflectionResponse) => (answer = response));
      stream.on("error", reject);
      stream.on("end", () => {
        if (!answer) return reject(new Error("the reflection stream ended without an answer"));
        const error = answer.errorResponse;
        if (error) return reject(Object.assign(new Error(error.errorMessage), { code: error.errorCode }));
        resolve(answer);
      });
      stream.write(request);
      stream.end();
    });
  }

  /** The names ListServices returns, sorted (as grpcurl prints them). */
  async listServices(): Promise<string[]> {
    const response = await this.ask({ listServices: "*" });
    return response.listServicesResponse!.service.map((service) => service.name).sort();
  }

  /** The file descriptors sent for a symbol, decoded, before any follow-up request. */
  async filesContaining(symbol: string): Promise<FileDescriptorProto[]> {
    const response = await this.ask({ fileContainingSymbol: symbol });
    return response.fileDescriptorResponse!.fileDescriptorProto.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
  }

  async fileByName(name: string): Promise<FileDescriptorProto[]> {
    const response = await this.ask({ fileByFilename: name });
    return response.fileDescriptorResponse!.fileDescriptorProto.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
  }

  /** The service `name`, from descriptors fetched as grpcurl does: by symbol, then any missing import by file name. */
  async service(name: string): Promise<DescService> {
    const files = new Map<string, FileDescriptorProto>();
    const root = await this.filesContaining(name);
    for (const file of root) files.set(file.name, file);
    const missing = (file: FileDescriptorProto) => file.dependency.filter((dependency) => !files.has(dependency));
    for (let pending = [...files.values()].flatMap(missing); pending.length > 0; pending = [...files.values()].flatMap(missing)) {
      for (const file of await this.fileByName(pending[0]!)) files.set(file.name, file);
    }
    // Dependencies before dependents: protobuf-es's resolving form adds them out of order.
    const ordered: FileDescriptorProto[] = [];
    const place = (file: FileDescriptorProto) => {
      if (ordered.includes(file)) return;
      for (const dependency of file.dependency) place(files.get(dependency)!);
      ordered.push(file);
    };
    for (const file of files.values()) place(file);
    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: ordered }));
    const service = registry.getService(name);
    if (!service) throw new Error(`reflection sent no service ${name}`);
    return service;
  }

  private async method(fullName: string): Promise<{ client: grpc.Client; method: DescMethod; path: string }> {
    const [serviceName, methodName] = fullName.split("/") as [string, string];
    const service = await this.service(serviceName);
    const method = service.methods.find((m) => m.name === methodName);
    if (!method) throw new Error(`${serviceName} has no method ${methodName}`);
    let client = this.channels.get(serviceName);
    if (!client) {
      client = new grpc.Client(this.address, grpc.credentials.createInsecure());
      this.channels.set(serviceName, client);
    }
    return { client, method, path: `/${serviceName}/${methodName}` };
  }

  /** Calls a unary method ("pkg.Service/Method") with a JSON request; resolves to the JSON response. */
  async unary(fullName: string, request: JsonValue = {}, metadata = new grpc.Metadata()): Promise<JsonValue> {
    const { client, method, path } = await this.method(fullName);
    return new Promise((resolve, reject) =>
      client.makeUnaryRequest(
        path,
        (message) => Buffer.from(toBinary(method.input, message)),
        (bytes: Buffer) => fromBinary(method.output, bytes),
        fromJson(method.input, request),
        metadata,
        (error, response) => (error ? reject(error) : resolve(toJson(method.output, response!))),
      ),
    );
  }

  /** Opens a server-streaming method; its messages arrive as JSON. */
  async stream(fullName: string, request: JsonValue = {}, metadata = new grpc.Metadata()): Promise<JsonStream> {
    const { client, method, path } = await this.method(fullName);
    const call = client.makeServerStreamRequest(
      path,
      (message) => Buffer.from(toBinary(method.input, message)),
      (bytes: Buffer) => fromBinary(method.output, bytes),
      fromJson(method.input, request),
      metadata,
    );
    return new JsonStream(call, (message) => toJson(method.output, message as never));
  }
}

/** A server stream read one message at a time; `end` settles with the call's final status. */
export class JsonStream {
  private readonly queue: JsonValue[] = [];
  private readonly waiting: ((message: JsonValue | null) => void)[] = [];
  private finished = false;
  /** The status code the stream ended with (0 for OK). */
  readonly end: Promise<number>;

  constructor(
    private readonly call: grpc.ClientReadableStream<unknown>,
    decode: (message: unknown) => JsonValue,
  ) {
    call.on("data", (message) => {
      const json = decode(message);
      const waiter = this.waiting.shift();
      if (waiter) waiter(json);
      else this.queue.push(json);
    });
    this.end = new Promise((resolve) => {
      call.on("status", (status: grpc.StatusObject) => {
        this.finished = true;
        for (const waiter of this.waiting.splice(0)) waiter(null);
        resolve(status.code);
      });
    });
    // The status event carries the outcome; without a listener an error would be thrown.
    call.on("error", () => {});
  }

  /** The next message, or null once the stream has ended. */
  next(): Promise<JsonValue | null> {
    const queued = this.queue.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (this.finished) return Promise.resolve(null);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  cancel(): void {
    this.call.cancel();
  }
}
