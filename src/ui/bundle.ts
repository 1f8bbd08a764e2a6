// The dashboard's assets, built from TypeScript by Bun's bundler (src/ui/app/main.ts and the
// stylesheet it imports) on the first request a role gets for /ui, in memory, and kept for
// the life of the process: `bun start` serves them with no build step, and a read-only root
// (the compose file's) is no obstacle. Each is served gzipped when the browser takes it.
import { join } from "node:path";

export interface Asset {
  /** The name it is served under, /ui/assets/<name>. */
  name: string;
  contentType: string;
  body: Uint8Array;
  gzipped: Uint8Array;
}

export interface UiBundle {
  assets: Map<string, Asset>;
  /** A hash of every asset: the shell's asset URLs carry it, so a new build is never cached as the old. */
  version: string;
}

const ENTRY = join(import.meta.dir, "app", "main.ts");

const CONTENT_TYPES: Record<string, string> = {
  js: "text/javascript; charset=utf-8",
  css: "text/css; charset=utf-8",
};

/** Builds the bundle (minified, for browsers); throws with the bundler's messages on failure. */
export async function buildUi(): Promise<UiBundle> {
  const result = await Bun.build({
    entrypoints: [ENTRY],
    target: "browser",
    minify: true,
    naming: { entry: "app.[ext]", asset: "[name].[ext]", chunk: "[name].[ext]" },
    throw: false,
  });
  if (!result.success) throw new Error(`building the dashboard failed: ${result.logs.map(String).join("; ")}`);
  const assets = new Map<string, Asset>();
  const hasher = new Bun.CryptoHasher("sha256");
  for (const output of result.outputs) {
    const name = output.path.replace(/^.*\//, "");
    const extension = name.replace(/^.*\./, "");
    const body = new Uint8Array(await output.arrayBuffer());
    hasher.update(body);
    assets.set(name, {
      name,
      contentType: CONTENT_TYPES[extension] ?? "application/octet-stream",
      body,
      gzipped: Bun.gzipSync(body, { level: 9 }),
    });
  }
  if (!assets.has("app.js") || !assets.has("app.css")) {
    throw new Error(`building the dashboard gave ${[...assets.keys()].join(", ")}, not app.js and app.css`);
  }
  return { assets, version: hasher.digest("hex").slice(0, 12) };
}

let built: Promise<UiBundle> | null = null;

/** The process's bundle, built once (a failed build is tried again on the next request). */
export function uiBundle(): Promise<UiBundle> {
  if (!built) {
    built = buildUi();
    built.catch(() => {
      built = null;
    });
  }
  return built;
}
