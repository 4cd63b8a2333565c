// Starts the OpenTelemetry SDK for the server process when it is asked for through
// the standard OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console, OTEL_EXPORTER_OTLP_ENDPOINT,
// OTEL_METRICS_EXPORTER=otlp|prometheus|console, …). Without them nothing is started and
// the @opentelemetry/api calls in the code stay no-ops. Imported before anything else.
import { NodeSDK } from "@opentelemetry/sdk-node";

export async function startTelemetry(env = process.env): Promise<() => Promise<void>> {
  const wanted = Object.keys(env).some((k) => k.startsWith("OTEL_") && k !== "OTEL_SDK_DISABLED") && env.OTEL_SDK_DISABLED !== "true";
  if (!wanted) return async () => {};
  const sdk = new NodeSDK({ serviceName: env.OTEL_SERVICE_NAME ?? "loraforge", instrumentations: [] });
  sdk.start();
  return () => sdk.shutdown();
}
