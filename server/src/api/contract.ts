// The contract as the API shows it: gRPC server reflection, proto3 JSON for the CLI, and each
// field's comment from the .proto files. The descriptor set itself is loaded in core/contract.ts.
import { toBinary, type DescField, type DescMessage } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { ReflectionService } from "@grpc/reflection";
import type { Server } from "@grpc/grpc-js";
import { descriptorSet, messageDesc } from "../core/contract.js";

export { DESCRIPTOR_SET, protoJson, type Encoder } from "../core/contract.js";

/** A top-level message's descriptor, and the comment above each of its fields in the .proto file. */
export function contractMessage(typeName: string): { message: DescMessage; comment(field: DescField): string } {
  const message = messageDesc(typeName);
  const file = message.file.proto;
  const index = file.messageType.indexOf(message.proto);
  const comments = new Map<string, string>();
  // SourceCodeInfo paths: 4 = FileDescriptorProto.message_type, 2 = DescriptorProto.field.
  for (const loc of file.sourceCodeInfo?.location ?? [])
    if (loc.path.length === 4 && loc.path[0] === 4 && loc.path[1] === index && loc.path[2] === 2) comments.set(String(loc.path[3]), loc.leadingComments.trim());
  return { message, comment: (field) => comments.get(String(message.proto.field.indexOf(field.proto))) ?? "" };
}

/** Adds gRPC server reflection (v1 and v1alpha) describing every service and message of the contract. */
export function addReflection(server: Server): void {
  // ReflectionService reads only `fileDescriptorProtos` of each entry. The files go in
  // as buf wrote them: proto-loader's loaders would merge each package into one file
  // and drop its imports, which clients such as buf curl then cannot link.
  const files = descriptorSet().file.map((f) => toBinary(FileDescriptorProtoSchema, f));
  const pkg = { "loraforge.contract": { fileDescriptorProtos: files } } as unknown as ConstructorParameters<typeof ReflectionService>[0];
  new ReflectionService(pkg).addToServer(server);
}
