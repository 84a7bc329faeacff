// The npm layout (napi-rs convention): the addon comes from the platform
// package @switchyard/<platform>, installed through the main package's
// optionalDependencies; on a platform without one, loading fails with an
// error naming the platform. Runs against the installed tarballs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);

/** Loads the installed package in a child node whose process.platform,
 * process.arch and glibc report are replaced first. */
function loadAs({ platform, arch, glibc = true }, how = "require") {
  const fake = `
    Object.defineProperty(process, "platform", { value: ${JSON.stringify(platform)} });
    Object.defineProperty(process, "arch", { value: ${JSON.stringify(arch)} });
    if (!${glibc}) { const r = process.report.getReport; process.report.getReport = () => { const o = r.call(process.report); delete o.header.glibcVersionRuntime; return o; }; }`;
  const load = how === "require" ? `require("switchyard");` : `await import("switchyard");`;
  return spawnSync(process.execPath, ["--input-type=module", "-e",
    `import { createRequire } from "node:module"; const require = createRequire(process.cwd() + "/"); ${fake} ${load} console.log("loaded");`],
  { cwd: join(dirname(new URL(import.meta.url).pathname), ".."), encoding: "utf8" });
}

test("the addon is the platform package's, installed through optionalDependencies", () => {
  const main = JSON.parse(readFileSync(require.resolve("switchyard/package.json"), "utf8"));
  assert.deepEqual(Object.keys(main.optionalDependencies), ["@switchyard/linux-x64-gnu"]);
  assert.equal(main.optionalDependencies["@switchyard/linux-x64-gnu"], main.version);
  const platformPkg = JSON.parse(readFileSync(require.resolve("@switchyard/linux-x64-gnu/package.json"), "utf8"));
  assert.deepEqual([platformPkg.os, platformPkg.cpu, platformPkg.libc], [["linux"], ["x64"], ["glibc"]]);
  assert.equal(platformPkg.version, main.version);
  assert.match(require.resolve("@switchyard/linux-x64-gnu"), /switchyard\.linux-x64-gnu\.node$/);
  const r = loadAs({ platform: "linux", arch: "x64" });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /loaded/);
});

for (const how of ["require", "import"]) {
  test(`an unsupported platform fails to load with an error naming it (${how})`, () => {
    const r = loadAs({ platform: "freebsd", arch: "arm64" }, how);
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /switchyard: no native addon for this platform \(freebsd-arm64\)/);
    assert.match(r.stderr, /publishes native addons for linux-x64-gnu only/);
  });
}

test("musl is told apart from glibc", () => {
  const r = loadAs({ platform: "linux", arch: "x64", glibc: false });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /no native addon for this platform \(linux-x64-musl\)/);
});
