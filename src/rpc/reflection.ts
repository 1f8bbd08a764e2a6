// gRPC server reflection (grpc.reflection.v1 and v1alpha, by @grpc/reflection), so that tools
// such as grpcurl and Postman can list and call the services without the .proto files. The
// descriptors are the ones protobuf-es generated into src/gen, byte for byte: no .proto file
// is read at run time, and whatever the generated code contains is described.
import { type DescFile, type DescService, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import type * as grpc from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";

/** @grpc/reflection's input: a proto-loader PackageDefinition. */
type PackageDefinition = ConstructorParameters<typeof ReflectionService>[0];

/** `files` and every file they import, transitively (the well-known types included), once each. */
function withDependencies(files: DescFile[]): DescFile[] {
  const seen = new Map<string, DescFile>();
  const visit = (file: DescFile) => {
    if (seen.has(file.proto.name)) return;
    seen.set(file.proto.name, file);
    for (const dependency of file.dependencies) visit(dependency);
  };
  for (const file of files) visit(file);
  return [...seen.values()];
}

/**
 * A PackageDefinition carrying the serialized FileDescriptorProto of `files` and of all they
 * import. @grpc/reflection reads nothing else from a definition than each entry's
 * `fileDescriptorProtos` (it decodes them and indexes files by name, and symbols, services and
 * dependencies from their contents), so there is one entry per file. proto-loader's own
 * loaders would merge the files of one package into one renamed file; these keep their names.
 */
export function descriptorPackage(files: DescFile[]): PackageDefinition {
  const entries = withDependencies(files).map((file) => [
    file.proto.name,
    { fileDescriptorProtos: [Buffer.from(toBinary(FileDescriptorProtoSchema, file.proto))] },
  ]);
  return Object.fromEntries(entries) as unknown as PackageDefinition;
}

/** Serves reflection (v1 and v1alpha) describing `services`, from their generated files. */
export function addReflection(server: grpc.Server, services: DescService[]): void {
  new ReflectionService(descriptorPackage(services.map((service) => service.file))).addToServer(server);
}
