// Runs the Python engine as one child process per job and reads its events: one
// proto3-JSON JobEvent per line on stdout (without job id and sequence, which the
// worker assigns; artifacts named by their path in the output folder); logs arrive
// on stderr. A crash or out-of-memory kills the child, never the server.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { JobEvent } from "@loraforge/sdk/gen/loraforge/v1/job";
import { TrainingSpec } from "@loraforge/sdk/gen/loraforge/v1/training_spec";
import { childEnv } from "../core/child-env.js";
import { fromProtoJson, protoJson } from "../core/contract.js";

/** How the engine ended. Exit codes are the engine's contract (engine/README.md). */
export interface EngineExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** The last lines it wrote on stderr, for a failure report. */
  stderrTail: string[];
}

/** RANK_LOST: a rank of a data-parallel run (spec.num_devices > 1) died; a retry resumes from the last checkpoint. */
export const ENGINE_EXIT = { OK: 0, FAILED: 1, BAD_SPEC: 2, BAD_DATA: 3, STOPPED: 4, RANK_LOST: 5 } as const;

export interface EngineOptions {
  python: string;
  /** The folder holding the `loraforge_engine` package. */
  engineDir: string;
  /** This host's models folder, where a job's "models/<name>" base model is looked up (core/models.ts); unset: none. */
  modelsDir?: string;
  /** This host's data roots: a base model given by path is read only from files inside them (engine: confined.py). */
  dataRoots?: string[];
}

export class EngineRun {
  private readonly child: ChildProcess;
  readonly exited: Promise<EngineExit>;

  /**
   * Starts `train` on `spec` (whose data set must be a local folder or a hub name), writing into
   * `outputDir`; `resumeFrom` is "latest" (the newest checkpoint in outputDir) or a checkpoint folder.
   */
  constructor(
    opts: EngineOptions,
    spec: TrainingSpec,
    readonly outputDir: string,
    resumeFrom: string | undefined,
    onEvent: (ev: JobEvent) => void,
    onStderr: (line: string) => void,
    extraEnv: Record<string, string> = {},
  ) {
    mkdirSync(outputDir, { recursive: true });
    const specFile = path.join(outputDir, "spec.json");
    writeFileSync(specFile, JSON.stringify(protoJson(TrainingSpec, "loraforge.v1.TrainingSpec", spec), null, 2));
    const args = ["-m", "loraforge_engine", "train", "--spec", specFile, "--output-dir", outputDir];
    if (resumeFrom) args.push("--resume-from", resumeFrom);
    this.child = spawn(opts.python, args, {
      env: childEnv({ ...extraEnv, PYTHONPATH: opts.engineDir, PYTHONUNBUFFERED: "1", LORAFORGE_SUPERVISOR_PID: String(process.pid) }),
      stdio: ["ignore", "pipe", "pipe"],
    });
    const tail: string[] = [];
    createInterface({ input: this.child.stdout! }).on("line", (line) => {
      if (!line.trim()) return;
      let ev: JobEvent;
      try {
        ev = fromProtoJson(JobEvent, "loraforge.v1.JobEvent", JSON.parse(line));
      } catch {
        onStderr(`engine wrote a line that is not an event: ${line.slice(0, 200)}`);
        return;
      }
      onEvent(ev);
    });
    createInterface({ input: this.child.stderr! }).on("line", (line) => {
      tail.push(line);
      if (tail.length > 40) tail.shift();
      onStderr(line);
    });
    this.exited = new Promise((resolve) => {
      this.child.on("error", (err) => {
        tail.push(`could not start the engine (${opts.python}): ${err.message}`);
        resolve({ code: null, signal: null, stderrTail: tail });
      });
      this.child.on("close", (code, signal) => resolve({ code, signal, stderrTail: tail }));
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Asks the engine to save a checkpoint and stop (it exits with ENGINE_EXIT.STOPPED). */
  stop(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGTERM");
  }

  /** Stops the engine, then kills it if it has not exited after `graceMs`. */
  async stopAndWait(graceMs: number): Promise<EngineExit> {
    this.stop();
    const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }
}
