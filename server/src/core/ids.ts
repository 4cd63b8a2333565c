import { randomBytes } from "node:crypto";

const ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz";

/**
 * A new job id: "job-" + 10 characters of millisecond time + 8 random ones, all in
 * Crockford base32, so ids sort by creation time (ListJobs pages by id).
 */
export function newJobId(now = Date.now()): string {
  let t = "";
  let ms = now;
  for (let i = 0; i < 10; i++) {
    t = ALPHABET[ms % 32] + t;
    ms = Math.floor(ms / 32);
  }
  const rnd = [...randomBytes(8)].map((b) => ALPHABET[b % 32]).join("");
  return `job-${t}${rnd}`;
}

export const JOB_ID_PATTERN = /^job-[0-9a-z]{18}$/;
