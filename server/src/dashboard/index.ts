// The live dashboard: a small HTTP server (node:http) beside the gRPC API that
// serves one static page and a JSON + server-sent-events API over the same job
// operations the gRPC front door uses (Jobs). The page follows a job through the
// replayable event stream, so a reload shows the whole history and then goes on
// live. Protection: it binds loopback by default, and with a token set every
// request must carry it (Authorization: Bearer, the cookie set by ?token=, or
// ?token= itself); see docs/dashboard.md.
import { createHash, timingSafeEqual } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { createRequire } from "node:module";
import type { AddressInfo, Socket } from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { Jobs } from "../jobs/jobs.js";
import { log } from "../core/log.js";
import { handleApi, JobListFeed, sendJson } from "./api.js";

export interface DashboardOptions {
  /** host:port to listen on; port 0 picks a free one. A loopback host keeps it on this machine. */
  address: string;
  /** When set (non-empty), every request must carry this token. */
  token?: string;
}

export interface Dashboard {
  /** The page's address, e.g. "http://127.0.0.1:8080/". */
  url: string;
  /** Stops listening and ends every open event stream. */
  close(): Promise<void>;
}

/** The cookie a `?token=` visit sets, so that the page's images and event streams are authorized too. */
export const TOKEN_COOKIE = "loraforge_dashboard_token";

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** The page's files: beside the compiled module if copied there, else in the source tree. */
const STATIC_DIR = [path.join(HERE, "static"), path.resolve(HERE, "../../src/dashboard/static")].find((d) =>
  existsSync(path.join(d, "index.html")),
);
const UPLOT_DIST = path.join(path.dirname(createRequire(import.meta.url).resolve("uplot/package.json")), "dist");

interface StaticFile {
  body: Buffer;
  type: string;
}

function loadStatic(): Map<string, StaticFile> {
  if (!STATIC_DIR) throw new Error(`dashboard page files not found (looked in ${path.join(HERE, "static")} and server/src/dashboard/static)`);
  const files: [string, string, string][] = [
    ["/", path.join(STATIC_DIR, "index.html"), "text/html; charset=utf-8"],
    ["/static/app.js", path.join(STATIC_DIR, "app.js"), "text/javascript; charset=utf-8"],
    ["/static/style.css", path.join(STATIC_DIR, "style.css"), "text/css; charset=utf-8"],
    ["/static/uPlot.iife.min.js", path.join(UPLOT_DIST, "uPlot.iife.min.js"), "text/javascript; charset=utf-8"],
    ["/static/uPlot.min.css", path.join(UPLOT_DIST, "uPlot.min.css"), "text/css; charset=utf-8"],
  ];
  return new Map(files.map(([route, file, type]) => [route, { body: readFileSync(file), type }]));
}

/** "host:port" → [host, port]; the host may be bracketed IPv6 ("[::1]:8080"). */
export function parseAddress(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(":");
  const host = address.slice(0, i).replace(/^\[(.*)\]$/, "$1");
  const port = Number(address.slice(i + 1));
  if (i <= 0 || !host || !Number.isInteger(port) || port < 0 || port > 65535)
    throw new Error(`dashboard address must be HOST:PORT, got ${JSON.stringify(address)}`);
  return { host, port };
}

const isLoopbackHost = (h: string) => h === "localhost" || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h);

const digest = (s: string) => createHash("sha256").update(s).digest();

function cookies(req: IncomingMessage): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of (req.headers.cookie ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    try {
      out.set(part.slice(0, eq).trim(), decodeURIComponent(part.slice(eq + 1).trim()));
    } catch {
      // A malformed cookie is ignored, like a missing one.
    }
  }
  return out;
}

const SECURITY_HEADERS = {
  "x-content-type-options": "nosniff",
  // The token may be in the address; never send it on to another site.
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
};

const PAGE_CSP =
  "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/** Starts the dashboard's HTTP server on `opts.address`; resolves once it listens. */
export async function startDashboard(jobs: Jobs, opts: DashboardOptions): Promise<Dashboard> {
  const { host, port } = parseAddress(opts.address);
  const files = loadStatic();
  const token = opts.token ? digest(opts.token) : null;
  const loopbackOnly = isLoopbackHost(host);
  const feed = new JobListFeed(jobs);
  /** Aborted on close: ends every event stream. */
  const closing = new AbortController();

  const tokenMatches = (candidate: string | undefined) =>
    candidate !== undefined && token !== null && timingSafeEqual(digest(candidate), token);

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) res.setHeader(k, v);
    const url = new URL(req.url ?? "/", "http://dashboard.invalid");

    // Bound to loopback: refuse other Host names, so that a web page on another
    // site cannot reach it by DNS rebinding.
    if (loopbackOnly) {
      const hostHeader = (req.headers.host ?? "").replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");
      if (!isLoopbackHost(hostHeader)) return sendJson(res, 403, { error: "HOST_NOT_ALLOWED", message: "this dashboard answers on loopback names only" });
    }

    if (token) {
      const bearer = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? "")?.[1]?.trim();
      const queryToken = url.searchParams.get("token") ?? undefined;
      const ok = tokenMatches(bearer) || tokenMatches(cookies(req).get(TOKEN_COOKIE)) || tokenMatches(queryToken);
      if (!ok) {
        res.setHeader("www-authenticate", 'Bearer realm="loraforge dashboard"');
        return sendJson(res, 401, {
          error: "UNAUTHENTICATED",
          message: "this dashboard needs its token: open it as /?token=TOKEN once, or send Authorization: Bearer TOKEN",
        });
      }
      if (queryToken !== undefined && tokenMatches(queryToken)) {
        // Remember it in a cookie (for the page's images and event streams) and
        // take it out of the address bar and history.
        res.setHeader("set-cookie", `${TOKEN_COOKIE}=${encodeURIComponent(opts.token!)}; Path=/; HttpOnly; SameSite=Strict`);
        if (req.method === "GET" && url.pathname === "/") {
          url.searchParams.delete("token");
          res.writeHead(303, { location: url.pathname + url.search });
          res.end();
          return;
        }
      }
    }

    const file = req.method === "GET" || req.method === "HEAD" ? files.get(url.pathname) : undefined;
    if (file) {
      res.writeHead(200, {
        "content-type": file.type,
        "content-length": file.body.length,
        "cache-control": "no-cache",
        ...(url.pathname === "/" ? { "content-security-policy": PAGE_CSP } : {}),
      });
      res.end(req.method === "HEAD" ? undefined : file.body);
      return;
    }
    if (url.pathname.startsWith("/api/")) return handleApi(jobs, feed, req, res, url, closing.signal);
    sendJson(res, 404, { error: "NOT_FOUND", message: `no such page: ${url.pathname}` });
  }

  const sockets = new Set<Socket>();
  const server = createServer((req, res) => {
    handle(req, res).catch((err) => {
      log("error", "dashboard request failed", { path: req.url, error: err instanceof Error ? err.message : String(err) });
      if (!res.headersSent) sendJson(res, 500, { error: "INTERNAL", message: "internal error" });
      else res.destroy();
    });
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    const fail = (err: NodeJS.ErrnoException) =>
      reject(new Error(`dashboard: cannot listen on ${opts.address} (${err.code ?? err.message}); choose another with --dashboard HOST:PORT, or turn it off with --dashboard off`));
    server.once("error", fail);
    server.listen(port, host, () => {
      server.off("error", fail);
      resolve();
    });
  });
  const bound = (server.address() as AddressInfo).port;
  const url = `http://${host.includes(":") ? `[${host}]` : host}:${bound}/`;
  log("info", "dashboard listening", { url, token: token ? "required" : "none" });
  if (!loopbackOnly && !token)
    log("warn", "the dashboard listens beyond loopback without a token: anyone who reaches it can read jobs and cancel them (set LORAFORGE_DASHBOARD_TOKEN)", { url });

  let closed: Promise<void> | null = null;
  return {
    url,
    close: () =>
      (closed ??= (async () => {
        closing.abort();
        feed.stop();
        await new Promise<void>((resolve) => {
          server.close(() => resolve());
          // Event streams never end by themselves; idle keep-alive sockets neither.
          setTimeout(() => {
            for (const s of sockets) s.destroy();
          }, 500).unref();
          server.closeIdleConnections();
        });
      })()),
  };
}
