// Minimal structured logging to stderr (stdout stays free for the CLI's output).
const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;
export type Level = keyof typeof LEVELS;

const threshold = LEVELS[(process.env.LORAFORGE_LOG_LEVEL as Level) ?? "info"] ?? LEVELS.info;

export function log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
  if (LEVELS[level] < threshold) return;
  const extra = Object.entries(fields)
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" ");
  process.stderr.write(`${new Date().toISOString()} ${level.toUpperCase()} ${msg}${extra ? " " + extra : ""}\n`);
}
