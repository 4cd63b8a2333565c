// The whole contract as one descriptor set, proto/loraforge.binpb (written by
// `npm run generate`, checked by scripts/test.sh): the source of gRPC server
// reflection and of the CLI's proto3 JSON.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createFileRegistry, fromBinary, toBinary, toJson, type DescField, type DescMessage, type FileRegistry, type JsonValue } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { ReflectionService } from "@grpc/reflection";
import type { Server } from "@grpc/grpc-js";

/** proto/loraforge.binpb: a google.protobuf.FileDescriptorSet of every .proto in proto/ and their imports. */
export const DESCRIPTOR_SET = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../proto/loraforge.binpb");

let registry: FileRegistry | undefined;
const descriptorSet = () => fromBinary(FileDescriptorSetSchema, readFileSync(DESCRIPTOR_SET));
const contract = () => (registry ??= createFileRegistry(descriptorSet()));

/** What ts-proto generates for each message: `Job.encode(job).finish()` gives its wire bytes. */
export interface Encoder<T> {
  encode(message: T): { finish(): Uint8Array };
}

/**
 * A message in proto3's canonical JSON: lowerCamelCase names, enum value names, 64-bit
 * integers as strings, timestamps in RFC 3339, bytes in base64, default values left out.
 * `typeName` is the message's full name, e.g. "loraforge.v1.Job".
 */
export function protoJson<T>(codec: Encoder<T>, typeName: string, message: T): JsonValue {
  const desc = contract().getMessage(typeName);
  if (!desc) throw new Error(`${typeName} is not in ${DESCRIPTOR_SET}`);
  return toJson(desc, fromBinary(desc, codec.encode(message).finish()), { registry: contract() });
}

/** A top-level message's descriptor, and the comment above each of its fields in the .proto file. */
export function contractMessage(typeName: string): { message: DescMessage; comment(field: DescField): string } {
  const message = contract().getMessage(typeName);
  if (!message) throw new Error(`${typeName} is not in ${DESCRIPTOR_SET}`);
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
