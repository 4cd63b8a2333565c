// What a worker can run and which jobs fit it. A worker advertises its devices (kind, count, memory
// per device), found once at start by asking the engine (`python -m loraforge_engine devices`) and
// overridable by the operator; it pulls only jobs whose spec (device_kind, num_devices,
// min_device_memory_mb) it meets. The same rule explains to clients why a job waits (Job.queued_reason).
// Everything here but detectDevices is pure.
import { spawn } from "node:child_process";
import os from "node:os";
import { DeviceKind, type TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { childEnv } from "../core/child-env.js";
import type { EngineOptions } from "./engine.js";

export type Kind = "cpu" | "cuda";

/** What one worker offers: `devices` devices of `kind`, each with `memoryMb` MiB (GPU memory on CUDA, host memory on CPU). */
export interface Capabilities {
  kind: Kind;
  devices: number;
  memoryMb: number;
}

/** What a job asks of a worker (TrainingSpec's device fields with their defaults applied). */
export interface Requirement {
  /** UNSPECIFIED: any kind (the worker's own). */
  kind: DeviceKind;
  devices: number;
  memoryMb: number;
}

/** A live worker as the registry (JobStore.liveWorkers) holds it. */
export interface LiveWorker extends Capabilities {
  id: string;
  /** The job it runs, "" while idle. */
  busy: string;
}

/** The operator's overrides (LORAFORGE_WORKER_DEVICE_KIND, LORAFORGE_WORKER_DEVICES, LORAFORGE_WORKER_DEVICE_MEMORY_MB). */
export interface DeviceOverrides {
  kind?: Kind;
  devices?: number;
  memoryMb?: number;
}

export function requirementOf(spec: TrainingSpec | undefined): Requirement {
  return {
    kind: spec?.deviceKind ?? DeviceKind.DEVICE_KIND_UNSPECIFIED,
    devices: spec?.numDevices ?? 1,
    memoryMb: spec?.minDeviceMemoryMb ?? 0,
  };
}

const KIND_OF: Partial<Record<DeviceKind, Kind>> = { [DeviceKind.DEVICE_KIND_CPU]: "cpu", [DeviceKind.DEVICE_KIND_CUDA]: "cuda" };

/** The fit rule: the kind matches (UNSPECIFIED matches any), enough devices, enough memory on each. */
export function fits(req: Requirement, cap: Capabilities): boolean {
  const kind = KIND_OF[req.kind];
  return (kind === undefined || kind === cap.kind) && cap.devices >= req.devices && cap.memoryMb >= req.memoryMb;
}

/** "2 CUDA devices with ≥ 40000 MiB each", "1 device". */
export function describeRequirement(req: Requirement): string {
  const kind = KIND_OF[req.kind];
  const noun = `${kind ? kind.toUpperCase() + " " : ""}device${req.devices === 1 ? "" : "s"}`;
  const memory = req.memoryMb > 0 ? ` with ≥ ${req.memoryMb} MiB${req.devices === 1 ? "" : " each"}` : "";
  return `${req.devices} ${noun}${memory}`;
}

/** "live workers: 1 (cpu × 2, 23000 MiB)"; workers with the same devices are counted together. */
export function describeWorkers(workers: Capabilities[]): string {
  if (workers.length === 0) return "no live workers";
  const groups = new Map<string, number>();
  for (const w of workers) {
    const k = `${w.kind} × ${w.devices}, ${w.memoryMb} MiB`;
    groups.set(k, (groups.get(k) ?? 0) + 1);
  }
  const parts = [...groups].map(([k, n]) => (groups.size === 1 && n === 1 ? k : `${n}: ${k}`));
  return `live workers: ${workers.length} (${parts.join("; ")})`;
}

/**
 * Why a job nobody runs is waiting, given the live workers: none of them can run it (and what it
 * needs, what they have), or all that can are busy. "" when a free worker can run it (it is about
 * to start).
 */
export function queuedReason(req: Requirement, workers: LiveWorker[]): string {
  const able = workers.filter((w) => fits(req, w));
  if (able.length === 0) return `no worker can run this job: it needs ${describeRequirement(req)}; ${describeWorkers(workers)}`;
  if (able.every((w) => w.busy !== "")) {
    const n = able.length;
    return `waiting for a free worker: ${n === 1 ? "the one live worker that can run it is" : `all ${n} live workers that can run it are`} busy`;
  }
  return "";
}

/**
 * How long a declined job's queue message waits before it is offered again: 1 s after the first
 * decline, growing by 1 s a decline up to 30 s. Short at first, so a worker that can run it picks it
 * up soon after it appears; longer for a job nobody can run for a while, so that the redeliveries of
 * many such jobs (which the consumer serves before new messages) never crowd out jobs that fit.
 */
export function declineDelayMs(deliveryCount: number): number {
  return Math.min(30_000, 1000 * Math.max(1, deliveryCount));
}

const whole = (name: string, v: string, min: number): number => {
  if (!/^\d+$/.test(v.trim()) || Number(v) < min)
    throw new Error(`${name} must be a whole number${min > 0 ? ` ≥ ${min}` : " ≥ 0"}, got ${JSON.stringify(v)}`);
  return Number(v);
};

/** The operator's overrides from the environment; throws on a malformed value (the worker refuses to start). */
export function overridesFromEnv(env: NodeJS.ProcessEnv): DeviceOverrides {
  const o: DeviceOverrides = {};
  const kind = env.LORAFORGE_WORKER_DEVICE_KIND?.trim().toLowerCase();
  if (kind) {
    if (kind !== "cpu" && kind !== "cuda") throw new Error(`LORAFORGE_WORKER_DEVICE_KIND must be cpu or cuda, got ${JSON.stringify(env.LORAFORGE_WORKER_DEVICE_KIND)}`);
    o.kind = kind;
  }
  if (env.LORAFORGE_WORKER_DEVICES) o.devices = whole("LORAFORGE_WORKER_DEVICES", env.LORAFORGE_WORKER_DEVICES, 1);
  if (env.LORAFORGE_WORKER_DEVICE_MEMORY_MB) o.memoryMb = whole("LORAFORGE_WORKER_DEVICE_MEMORY_MB", env.LORAFORGE_WORKER_DEVICE_MEMORY_MB, 0);
  return o;
}

/** The engine's `devices` answer, checked: a malformed one is a detection failure, never advertised. */
export function parseDevices(text: string): Capabilities {
  const v = JSON.parse(text) as { kind?: unknown; count?: unknown; memory_mb?: unknown };
  const ok = (n: unknown) => typeof n === "number" && Number.isInteger(n) && n >= 0;
  if ((v.kind !== "cpu" && v.kind !== "cuda") || !ok(v.count) || !ok(v.memory_mb))
    throw new Error(`unexpected answer from the engine's devices command: ${text.trim().slice(0, 200)}`);
  return { kind: v.kind, devices: v.count as number, memoryMb: v.memory_mb as number };
}

/** This host's CPU as Node sees it: usable cores and total memory (the fallback when the engine cannot say). */
export function hostCpu(): Capabilities {
  return { kind: "cpu", devices: Math.max(1, os.availableParallelism()), memoryMb: Math.floor(os.totalmem() / 2 ** 20) };
}

/**
 * What the worker advertises: the operator's overrides over what was detected. A failed detection
 * falls back to this host's CPU; a CUDA override on a host where no GPU was found keeps the kind but
 * advertises 0 devices unless a count is given, so it takes no job it would fail. `warnings` say
 * what was assumed, for the log.
 */
export function resolveCapabilities(
  detected: Capabilities | Error,
  overrides: DeviceOverrides,
  cpu: Capabilities,
): { caps: Capabilities; warnings: string[] } {
  const warnings: string[] = [];
  const found = detected instanceof Error ? null : detected;
  if (detected instanceof Error) warnings.push(`device detection failed (${detected.message}); assuming this host's CPU`);
  const kind = overrides.kind ?? found?.kind ?? "cpu";
  let base: Capabilities;
  if (found?.kind === kind) base = found;
  else if (kind === "cpu") base = cpu;
  else {
    base = { kind, devices: 0, memoryMb: 0 };
    if (overrides.devices === undefined || overrides.memoryMb === undefined)
      warnings.push(
        "LORAFORGE_WORKER_DEVICE_KIND=cuda but no GPU was detected; set LORAFORGE_WORKER_DEVICES and LORAFORGE_WORKER_DEVICE_MEMORY_MB, or this worker advertises 0 devices / 0 MiB",
      );
  }
  return { caps: { kind, devices: overrides.devices ?? base.devices, memoryMb: overrides.memoryMb ?? base.memoryMb }, warnings };
}

/** Asks the engine once what this host has (torch's view: GPUs, else the CPU); `signal` kills the question. */
export function detectDevices(engine: EngineOptions, signal?: AbortSignal, timeoutMs = 120_000): Promise<Capabilities> {
  return new Promise((resolve, reject) => {
    const child = spawn(engine.python, ["-m", "loraforge_engine", "devices"], {
      env: childEnv({ PYTHONPATH: engine.engineDir, PYTHONUNBUFFERED: "1" }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-2000)));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    const abort = () => child.kill("SIGKILL");
    signal?.addEventListener("abort", abort);
    child.on("error", (e) => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", abort);
      reject(e);
    });
    child.on("close", (code, killedBy) => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", abort);
      if (code !== 0) return reject(new Error(`the engine's devices command ${killedBy ? `was killed by ${killedBy}` : `exited with code ${code}`}: ${err.trim().split("\n").at(-1) ?? ""}`));
      try {
        resolve(parseDevices(out));
      } catch (e) {
        reject(e as Error);
      }
    });
  });
}
