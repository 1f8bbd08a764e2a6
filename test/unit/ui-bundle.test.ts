// The dashboard's assets are built by Bun's bundler from src/ui/app, and stay small: under
// 150 KiB gzipped in all (the bound), with nothing to fetch from elsewhere.
import { expect, test } from "bun:test";
import { buildUi } from "../../src/ui/bundle";

const LIMIT_BYTES = 150 * 1024;

test("the bundle builds, and its assets are under 150 KiB gzipped in all", async () => {
  const bundle = await buildUi();
  expect([...bundle.assets.keys()].sort()).toEqual(["app.css", "app.js"]);
  const gzipped = [...bundle.assets.values()].reduce((sum, asset) => sum + asset.gzipped.length, 0);
  expect(gzipped).toBeGreaterThan(1000);
  expect(gzipped).toBeLessThan(LIMIT_BYTES);
  expect(bundle.version).toMatch(/^[0-9a-f]{12}$/);
});

test("no asset names another origin", async () => {
  const bundle = await buildUi();
  for (const asset of bundle.assets.values()) {
    const text = new TextDecoder().decode(asset.body);
    // The only absolute URLs are the SVG namespace, which is a name, not a fetch.
    const urls = [...text.matchAll(/https?:\/\/[^\s"'`)]+/g)].map((m) => m[0]).filter((u) => u !== "http://www.w3.org/2000/svg");
    expect(urls).toEqual([]);
  }
});
