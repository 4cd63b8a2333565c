// The contract's rules (buf.validate constraints in proto/) applied to a request, with
// @bufbuild/protovalidate: one validator for the whole contract, built on first use. Each
// violation names its field by its path from the request, as clients write it
// ("spec.rank", "spec.target_modules[0]", "loras[1].scale").
import { isReflectList, isReflectMessage, reflect, pathToString, type Path, type ReflectMessage } from "@bufbuild/protobuf/reflect";
import { createValidator, type Validator } from "@bufbuild/protovalidate";
import { contractRegistry, reflected, type Encoder } from "./contract.js";
import type { FieldViolation } from "./errors.js";

let validator: Validator | undefined;

/** Every rule of `typeName` that `message` breaks, each naming its field; empty when it keeps them all. */
export function ruleViolations<T>(codec: Encoder<T>, typeName: string, message: T): FieldViolation[] {
  const { desc, message: m } = reflected(codec, typeName, message);
  validator ??= createValidator({ registry: contractRegistry() });
  const result = validator.validate(desc, m);
  if (result.kind === "valid") return [];
  // "error" is a rule the validator cannot evaluate: a broken contract, not a bad request.
  if (result.kind === "error") throw result.error;
  return result.violations.map((v) => {
    const root = reflect(desc, m);
    const got = shownValue(root, v.field);
    const at = pathToString(v.field);
    const across = crossFieldName(root, v.field, v.ruleId);
    const field = across ? (at ? `${at}.${across}` : across) : at;
    return { field, description: got === undefined ? v.message : `${v.message}, got ${got}` };
  });
}

/**
 * A message's rule across its fields (a CEL rule on the message, whose violation points at the
 * message) is named by the field its id starts with: "class_prompt.required_with_prior_preservation"
 * on the spec → "spec.class_prompt", as the engine names it.
 */
function crossFieldName(root: ReflectMessage, path: Path, ruleId: string): string | undefined {
  if (!ruleId.includes(".")) return undefined;
  let cur: unknown = root;
  for (const step of path) {
    if (step.kind === "field" && isReflectMessage(cur)) cur = cur.get(step);
    else return undefined;
  }
  if (!isReflectMessage(cur)) return undefined;
  const name = ruleId.split(".")[0];
  return cur.desc.fields.some((f) => f.name === name) ? name : undefined;
}

/** The value at `path` as a short text for a message ("0", "\"to q\""), or undefined for messages, lists and bytes. */
function shownValue(root: ReflectMessage, path: Path): string | undefined {
  let cur: unknown = root;
  for (const step of path) {
    if (step.kind === "field" && isReflectMessage(cur)) cur = cur.get(step);
    else if (step.kind === "list_sub" && isReflectList(cur)) cur = cur.get(step.index);
    else return undefined;
  }
  switch (typeof cur) {
    case "string":
      return JSON.stringify(cur.length > 80 ? cur.slice(0, 80) + "…" : cur);
    case "number":
    case "bigint":
    case "boolean":
      return String(cur);
    default:
      return undefined;
  }
}
