// How the server counts a data set folder's captioned images before accepting a Train (the engine reads the
// same sources): metadata.csv as RFC 4180 CSV (quoted commas, doubled quotes, line breaks in quotes, CRLF),
// and with an instance prompt every image, captions or not.
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { countCaptionedImages, csvRows } from "@loraforge/server/jobs/datasets";
import { datasetLine } from "@loraforge/server/cli/client";
import { CaptionSource, DatasetReport, SkipReason } from "@loraforge/sdk";

describe("data set folders", () => {
  it("csvRows reads quoted fields, doubled quotes, line breaks inside quotes and CRLF rows", () => {
    const text = 'file_name,text\r\na.png,"a cat, sitting"\r\nb.png,"say ""hi"""\nc.png,"two\nlines"\n\nd.png,\n';
    assert.deepEqual(csvRows(text), [
      ["file_name", "text"],
      ["a.png", "a cat, sitting"],
      ["b.png", 'say "hi"'],
      ["c.png", "two\nlines"],
      ["d.png", ""],
    ]);
  });

  it("the CLI's line for a data set report: counts, skipped names by reason, buckets, caches", () => {
    const r = DatasetReport.fromPartial({
      imagesFound: 13,
      imagesUsed: 10,
      skippedTotal: 3,
      skipped: [
        { name: "corrupt.png", reason: SkipReason.SKIP_REASON_CORRUPT, detail: "cannot be decoded" },
        { name: "tiny.png", reason: SkipReason.SKIP_REASON_TOO_SMALL },
        { name: "b.png", reason: SkipReason.SKIP_REASON_CORRUPT },
      ],
      captionSource: CaptionSource.CAPTION_SOURCE_SIDECAR_TXT,
      buckets: [
        { width: 80, height: 48, images: 4, batches: 2 },
        { width: 64, height: 64, images: 6, batches: 3 },
      ],
      latentsCached: 10,
      latentsCachedFlipped: true,
    });
    assert.equal(
      datasetLine(r),
      "data set: 10 of 13 images used, 3 skipped (corrupt: corrupt.png, b.png; too_small: tiny.png); sizes 80x48: 4, 64x64: 6; cached: latents of 10 (both orientations)",
    );
  });

  it("counts metadata.csv rows naming an image, uncaptioned images only with an instance prompt", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "loraforge-unit-set-"));
    for (const n of ["a.png", "b.png", "c.jpg"]) writeFileSync(path.join(dir, n), "");
    assert.equal(countCaptionedImages(dir), 0, "no captions of any kind");
    assert.equal(countCaptionedImages(dir, "file_name", "a photo of sks dog"), 3);
    writeFileSync(path.join(dir, "metadata.csv"), 'file_name,text\na.png,"one, two"\nb.png,x\n');
    assert.equal(countCaptionedImages(dir), 2);
    assert.equal(countCaptionedImages(dir, "image"), 0, "a column the header lacks");
    writeFileSync(path.join(dir, "metadata.jsonl"), JSON.stringify({ file_name: "c.jpg", text: "y" }) + "\n");
    assert.equal(countCaptionedImages(dir), 1, "metadata.jsonl comes first, as the engine reads it");
  });
});
