// Worker capabilities (server/src/jobs/capabilities.ts): the fit rule, the queued reason clients
// see, the decline delay, the operator's overrides and how detection and overrides combine.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { DeviceKind, TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import {
  declineDelayMs,
  fits,
  overridesFromEnv,
  parseDevices,
  queuedReason,
  requirementOf,
  resolveCapabilities,
  type Capabilities,
  type LiveWorker,
} from "@loraforge/server/jobs/capabilities";

const cpu2: Capabilities = { kind: "cpu", devices: 2, memoryMb: 23000 };
const gpu4: Capabilities = { kind: "cuda", devices: 4, memoryMb: 81559 };
const live = (c: Capabilities, busy = "", id = `w-${Math.random()}`): LiveWorker => ({ id, busy, ...c });

describe("the fit rule", () => {
  it("a spec without device fields asks for 1 device of any kind and no memory; every worker fits it", () => {
    const req = requirementOf(TrainingSpec.fromPartial({}));
    assert.deepEqual(req, { kind: DeviceKind.DEVICE_KIND_UNSPECIFIED, devices: 1, memoryMb: 0 });
    assert.ok(fits(req, cpu2));
    assert.ok(fits(req, gpu4));
    assert.deepEqual(requirementOf(undefined), req);
  });

  it("kind must match unless unspecified; count and memory are minimums (equal is enough)", () => {
    const need = (deviceKind: DeviceKind, numDevices: number, minDeviceMemoryMb: number) =>
      requirementOf(TrainingSpec.fromPartial({ deviceKind, numDevices, minDeviceMemoryMb }));
    assert.ok(fits(need(DeviceKind.DEVICE_KIND_CPU, 2, 23000), cpu2));
    assert.ok(!fits(need(DeviceKind.DEVICE_KIND_CPU, 3, 0), cpu2), "one device short");
    assert.ok(!fits(need(DeviceKind.DEVICE_KIND_CPU, 1, 23001), cpu2), "1 MiB short");
    assert.ok(!fits(need(DeviceKind.DEVICE_KIND_CUDA, 1, 0), cpu2), "a CUDA job on a CPU worker");
    assert.ok(!fits(need(DeviceKind.DEVICE_KIND_CPU, 1, 0), gpu4), "a CPU job on a CUDA worker");
    assert.ok(fits(need(DeviceKind.DEVICE_KIND_CUDA, 4, 80000), gpu4));
    assert.ok(fits(need(DeviceKind.DEVICE_KIND_UNSPECIFIED, 2, 20000), cpu2));
    assert.ok(!fits(need(DeviceKind.DEVICE_KIND_UNSPECIFIED, 2, 40000), cpu2));
  });
});

describe("the queued reason", () => {
  const cuda2 = requirementOf(TrainingSpec.fromPartial({ deviceKind: DeviceKind.DEVICE_KIND_CUDA, numDevices: 2, minDeviceMemoryMb: 40000 }));

  it("names what the job needs and what the live workers have when none fits", () => {
    assert.equal(
      queuedReason(cuda2, [live(cpu2)]),
      "no worker can run this job: it needs 2 CUDA devices with ≥ 40000 MiB each; live workers: 1 (cpu × 2, 23000 MiB)",
    );
    assert.equal(
      queuedReason(requirementOf(TrainingSpec.fromPartial({ minDeviceMemoryMb: 30000 })), [live(cpu2), live(cpu2), live({ kind: "cuda", devices: 1, memoryMb: 24576 })]),
      "no worker can run this job: it needs 1 device with ≥ 30000 MiB; live workers: 3 (2: cpu × 2, 23000 MiB; 1: cuda × 1, 24576 MiB)",
    );
    assert.equal(queuedReason(requirementOf(undefined), []), "no worker can run this job: it needs 1 device; no live workers");
  });

  it("says 'waiting for a free worker' when every worker that fits is busy, and nothing when one is free", () => {
    assert.equal(queuedReason(cuda2, [live(cpu2), live(gpu4, "job-1")]), "waiting for a free worker: the one live worker that can run it is busy");
    assert.equal(queuedReason(cuda2, [live(gpu4, "job-1"), live(gpu4, "job-2")]), "waiting for a free worker: all 2 live workers that can run it are busy");
    // A busy worker that does not fit is not counted; a free one that fits clears the reason.
    assert.equal(queuedReason(cuda2, [live(cpu2, "job-3"), live(gpu4)]), "");
  });
});

describe("declining", () => {
  it("hands a job back after 1 s at first, 1 s longer each time, never more than 30 s", () => {
    assert.deepEqual([0, 1, 2, 5, 29, 30, 31, 1000].map(declineDelayMs), [1000, 1000, 2000, 5000, 29000, 30000, 30000, 30000]);
  });
});

describe("what a worker advertises", () => {
  it("reads the operator's overrides and refuses malformed ones", () => {
    assert.deepEqual(overridesFromEnv({}), {});
    assert.deepEqual(
      overridesFromEnv({ LORAFORGE_WORKER_DEVICE_KIND: "CUDA", LORAFORGE_WORKER_DEVICES: "8", LORAFORGE_WORKER_DEVICE_MEMORY_MB: "0" }),
      { kind: "cuda", devices: 8, memoryMb: 0 },
    );
    assert.throws(() => overridesFromEnv({ LORAFORGE_WORKER_DEVICE_KIND: "tpu" }), /LORAFORGE_WORKER_DEVICE_KIND must be cpu or cuda, got "tpu"/);
    assert.throws(() => overridesFromEnv({ LORAFORGE_WORKER_DEVICES: "0" }), /LORAFORGE_WORKER_DEVICES must be a whole number ≥ 1, got "0"/);
    assert.throws(() => overridesFromEnv({ LORAFORGE_WORKER_DEVICES: "2.5" }), /LORAFORGE_WORKER_DEVICES/);
    assert.throws(() => overridesFromEnv({ LORAFORGE_WORKER_DEVICE_MEMORY_MB: "-1" }), /LORAFORGE_WORKER_DEVICE_MEMORY_MB must be a whole number ≥ 0/);
  });

  it("checks the engine's answer", () => {
    assert.deepEqual(parseDevices('{"kind": "cuda", "count": 2, "memory_mb": 81559, "names": ["H100", "H100"]}\n'), { kind: "cuda", devices: 2, memoryMb: 81559 });
    assert.throws(() => parseDevices('{"kind": "tpu", "count": 2, "memory_mb": 1}'), /unexpected answer/);
    assert.throws(() => parseDevices('{"kind": "cpu", "count": -1, "memory_mb": 1}'), /unexpected answer/);
    assert.throws(() => parseDevices("Traceback"), SyntaxError);
  });

  it("puts the overrides over what was detected", () => {
    const host = { kind: "cpu", devices: 16, memoryMb: 128000 } as const;
    assert.deepEqual(resolveCapabilities(gpu4, {}, host), { caps: gpu4, warnings: [] });
    assert.deepEqual(resolveCapabilities(gpu4, { memoryMb: 40000 }, host).caps, { kind: "cuda", devices: 4, memoryMb: 40000 });
    // CPU on a GPU host: the host's cores and memory, not the GPUs'.
    assert.deepEqual(resolveCapabilities(gpu4, { kind: "cpu" }, host).caps, host);
    assert.deepEqual(resolveCapabilities(cpu2, { devices: 4 }, host).caps, { kind: "cpu", devices: 4, memoryMb: 23000 });
  });

  it("a failed detection falls back to the CPU, with a warning; CUDA forced without a GPU advertises nothing it lacks", () => {
    const host = { kind: "cpu", devices: 16, memoryMb: 128000 } as const;
    const failed = resolveCapabilities(new Error("torch import failed"), {}, host);
    assert.deepEqual(failed.caps, host);
    assert.match(failed.warnings.join("\n"), /device detection failed \(torch import failed\); assuming this host's CPU/);
    const forced = resolveCapabilities(cpu2, { kind: "cuda" }, host);
    assert.deepEqual(forced.caps, { kind: "cuda", devices: 0, memoryMb: 0 });
    assert.match(forced.warnings.join("\n"), /no GPU was detected/);
    const told = resolveCapabilities(cpu2, { kind: "cuda", devices: 2, memoryMb: 24000 }, host);
    assert.deepEqual(told, { caps: { kind: "cuda", devices: 2, memoryMb: 24000 }, warnings: [] });
  });
});
