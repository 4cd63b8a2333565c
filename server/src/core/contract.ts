// The whole contract as one descriptor set, proto/loraforge.binpb (written by `npm run generate`,
// checked by scripts/test.sh), loaded once. It bridges ts-proto's messages (what grpc-js hands the
// handlers) to @bufbuild/protobuf's reflection, which the rules (rules.ts), proto3 JSON and gRPC
// server reflection need.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  createFileRegistry,
  fromBinary,
  fromJson,
  toBinary,
  toJson,
  type DescMessage,
  type FileRegistry,
  type JsonValue,
  type Message,
} from "@bufbuild/protobuf";
import { FileDescriptorSetSchema, type FileDescriptorSet } from "@bufbuild/protobuf/wkt";

/** proto/loraforge.binpb: a google.protobuf.FileDescriptorSet of every .proto in proto/ and their imports. */
export const DESCRIPTOR_SET = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../proto/loraforge.binpb");

let set: FileDescriptorSet | undefined;
let registry: FileRegistry | undefined;

/** The descriptor set as buf wrote it. */
export const descriptorSet = (): FileDescriptorSet => (set ??= fromBinary(FileDescriptorSetSchema, readFileSync(DESCRIPTOR_SET)));

/** Every message, enum and service of the contract and its imports, built once. */
export const contractRegistry = (): FileRegistry => (registry ??= createFileRegistry(descriptorSet()));

/** A message's descriptor by full name, e.g. "loraforge.v1.Job". */
export function messageDesc(typeName: string): DescMessage {
  const desc = contractRegistry().getMessage(typeName);
  if (!desc) throw new Error(`${typeName} is not in ${DESCRIPTOR_SET}`);
  return desc;
}

/** What ts-proto generates for each message: `Job.encode(job).finish()` gives its wire bytes. */
export interface Encoder<T> {
  encode(message: T): { finish(): Uint8Array };
}

/** What ts-proto generates for each message to read wire bytes back. */
export interface Decoder<T> {
  decode(bytes: Uint8Array): T;
}

/** A ts-proto message as a reflective @bufbuild/protobuf message of the same type (through its wire bytes). */
export function reflected<T>(codec: Encoder<T>, typeName: string, message: T): { desc: DescMessage; message: Message } {
  const desc = messageDesc(typeName);
  return { desc, message: fromBinary(desc, codec.encode(message).finish()) };
}

/**
 * A message in proto3's canonical JSON: lowerCamelCase names, enum value names, 64-bit
 * integers as strings, timestamps in RFC 3339, bytes in base64, default values left out.
 */
export function protoJson<T>(codec: Encoder<T>, typeName: string, message: T): JsonValue {
  const { desc, message: m } = reflected(codec, typeName, message);
  return toJson(desc, m, { registry: contractRegistry() });
}

/** Parses proto3 JSON into a ts-proto message (unknown fields are ignored: a newer writer may add some). */
export function fromProtoJson<T>(codec: Decoder<T>, typeName: string, json: JsonValue): T {
  const desc = messageDesc(typeName);
  const m = fromJson(desc, json, { registry: contractRegistry(), ignoreUnknownFields: true });
  return codec.decode(toBinary(desc, m));
}
