// The deployment files stay valid: NATS configs pass nats-server's own check, every
// Kubernetes manifest parses and names its kind, and Dockerfiles copy paths that exist.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { parseAllDocuments } from "yaml";
import { findNatsServer } from "@loraforge/server/core/nats-managed";
import { REPO } from "./lib/harness.js";

const deploy = path.join(REPO, "deploy");

describe("deploy/", () => {
  it("NATS configs pass `nats-server -t`", () => {
    for (const conf of readdirSync(path.join(deploy, "nats")).filter((n) => n.endsWith(".conf"))) {
      const r = spawnSync(findNatsServer(), ["-t", "-c", path.join(deploy, "nats", conf)], { encoding: "utf8", env: { ...process.env, SERVER_NAME: "nats-0" } });
      assert.equal(r.status, 0, `${conf}: ${r.stderr}${r.stdout}`);
    }
  });

  it("Kubernetes manifests parse, each with apiVersion, kind and name", () => {
    let count = 0;
    for (const file of readdirSync(path.join(deploy, "k8s")).filter((n) => n.endsWith(".yaml"))) {
      for (const doc of parseAllDocuments(readFileSync(path.join(deploy, "k8s", file), "utf8"))) {
        assert.deepEqual(doc.errors, [], file);
        const obj = doc.toJS() as { apiVersion?: string; kind?: string; metadata?: { name?: string } };
        assert.ok(obj.apiVersion && obj.kind && obj.metadata?.name, `${file}: ${JSON.stringify(obj).slice(0, 80)}`);
        count++;
      }
    }
    assert.ok(count >= 7);
  });

  it("Dockerfiles copy only paths that exist", () => {
    for (const file of readdirSync(path.join(deploy, "docker"))) {
      for (const line of readFileSync(path.join(deploy, "docker", file), "utf8").split("\n")) {
        const m = line.match(/^COPY\s+(.+)\s+\S+$/);
        if (!m) continue;
        for (const src of m[1].split(/\s+/)) assert.ok(existsSync(path.join(REPO, src)), `${file}: COPY ${src}`);
      }
    }
  });
});
