// Optional bearer-token authentication for every RPC but health checks: set
// LORAFORGE_API_TOKEN on the server and `token` in the SDK's createClient.
import { timingSafeEqual } from "node:crypto";
import { ServerInterceptingCall, status, type Metadata, type ServerInterceptor } from "@grpc/grpc-js";
import { ApiError, toServiceError } from "../core/errors.js";

export function tokenInterceptor(token: string): ServerInterceptor {
  const expected = Buffer.from(`Bearer ${token}`);
  return (method, call) =>
    new ServerInterceptingCall(call, {
      start(next) {
        next({
          onReceiveMetadata(md: Metadata, mdNext: (md: Metadata) => void) {
            if (method.path.startsWith("/grpc.health.v1.")) return mdNext(md);
            const got = Buffer.from(String(md.get("authorization")[0] ?? ""));
            if (got.length === expected.length && timingSafeEqual(got, expected)) return mdNext(md);
            const err = toServiceError(
              new ApiError(status.UNAUTHENTICATED, "UNAUTHENTICATED", "missing or wrong bearer token (createClient({ token }))"),
            );
            call.sendStatus({ code: err.code!, details: err.details!, metadata: err.metadata! });
          },
        });
      },
    });
}
