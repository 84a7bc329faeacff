// ESM entry point: the implementation is CommonJS (dist/index.js); this
// re-exports it under the same names, so `import { Worker } from "switchyard"`
// and `require("switchyard")` share one native addon and one set of classes.
import { createRequire } from "node:module";

const cjs = createRequire(import.meta.url)("./dist/index.js");

export const {
  nativeVersion,
  SwitchyardError,
  PermanentError,
  RetryableError,
  InvalidInput,
  PayloadTooLarge,
  AwaitTimeoutError,
  CancelledError,
  WaitTimeoutError,
  TaskFailedError,
  TaskCancelledError,
  NotFound,
  Conflict,
  LeaseLost,
  ConfigError,
  StoreError,
  ShutdownError,
  HttpError,
  NetworkError,
  isSuspension,
  Context,
  step,
  Decision,
  defaultStore,
  Worker,
  Client,
} = cjs;
export default cjs;
