// Shared by the examples: the store URL from --store (or a fresh temporary
// SQLite file) and a timestamped printer.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

const t0 = performance.now();

export function say(who: string, msg: string): void {
  console.log(`[${(performance.now() - t0).toFixed(0).padStart(7)} ms] ${who.padEnd(16)} ${msg}`);
}

/** `--store URL`, or a temporary SQLite file removed at exit. */
export function storeFromArgs(name: string): string {
  const { values } = parseArgs({ options: { store: { type: "string" } } });
  if (values.store) return values.store;
  const dir = mkdtempSync(join(tmpdir(), `switchyard-${name}-`));
  process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  return `sqlite:${join(dir, `${name}.db`)}`;
}

/** Waits until `cond()` holds, checking every 20 ms, for at most `ms`. */
export async function until(cond: () => Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
