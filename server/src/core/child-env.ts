// The environment handed to every child process (the engine, the ONNX exporter, a managed
// nats-server): the server's own, less the secrets no child needs. A child that is compromised,
// or that logs its environment, then cannot leak the API or dashboard token.
const SECRETS = ["LORAFORGE_API_TOKEN", "LORAFORGE_DASHBOARD_TOKEN", "LORAFORGE_NATS_URL", "LORAFORGE_NATS_USER", "LORAFORGE_NATS_PASSWORD"];

export function childEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  for (const name of SECRETS) delete env[name];
  return env;
}
