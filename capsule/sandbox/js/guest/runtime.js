// The JavaScript guest runtime: the component every JS/TS task instance runs
// (StarlingMonkey, built by componentize-js with this module as its entry).
// It exports the same `runner` as the Python runtime (wit/capsule.wit): `load`
// evaluates the program, bundled by the host into one CommonJS script, and
// `run` runs one task invocation on the loop of host.js.

import { abandonAll, clearTimer, monotonicMs, runUntilSettled, setTimer, toJson, write } from "./host.js";
import { fetch, Headers, HttpError, http, Response } from "./http.js";
import * as sdk from "./sdk.js";

// -- the globals a program sees ---------------------------------------------

function show(value, depth = 0) {
  if (typeof value === "string") return depth ? JSON.stringify(value) : value;
  if (value instanceof Error) return value.stack ? `${value.name}: ${value.message}\n${value.stack}` : String(value);
  if (typeof value === "function") return `[Function ${value.name || "(anonymous)"}]`;
  if (typeof value === "bigint") return `${value}n`;
  if (value === null || typeof value !== "object") return String(value);
  try {
    return JSON.stringify(value, (_, item) => (typeof item === "bigint" ? `${item}n` : item)) ?? String(value);
  } catch (_) {
    return Object.prototype.toString.call(value);
  }
}

function printer(stream) {
  return (...values) => write(stream, values.map((value) => show(value)).join(" ") + "\n");
}

const console = {
  log: printer("stdout"),
  info: printer("stdout"),
  debug: printer("stdout"),
  warn: printer("stderr"),
  error: printer("stderr"),
  trace: printer("stderr"),
};

// Math.random: a generator seeded by the host for each task (the same seed
// when a resumed run replays the task), not a host call per number.
let seed = [0x9e3779b9, 0x243f6a88, 0xb7e15162, 0x1234567];

function seedRandom(text) {
  let h = 2166136261;
  const state = [];
  for (let round = 0; round < 4; round++) {
    for (let i = 0; i < text.length; i++) {
      h ^= text.charCodeAt(i) + round;
      h = Math.imul(h, 16777619);
    }
    state.push(h >>> 0 || 1);
  }
  seed = state;
}

function random() {
  // sfc32
  let [a, b, c, d] = seed;
  const t = (((a + b) | 0) + d) | 0;
  d = (d + 1) | 0;
  a = b ^ (b >>> 9);
  b = (c + (c << 3)) | 0;
  c = (c << 21) | (c >>> 11);
  c = (c + t) | 0;
  seed = [a, b, c, d];
  return (t >>> 0) / 4294967296;
}

Object.assign(globalThis, {
  console,
  setTimeout: (callback, delay, ...args) => setTimer(callback, delay, args, false),
  setInterval: (callback, delay, ...args) => setTimer(callback, delay, args, true),
  clearTimeout: clearTimer,
  clearInterval: clearTimer,
  fetch,
  Headers,
  Response,
});
Math.random = random;
if (globalThis.performance) globalThis.performance.now = monotonicMs;
else globalThis.performance = { now: monotonicMs };

// -- the program -------------------------------------------------------------

const SDK_MODULE = "@capsule-run/sdk";
const sdkExports = Object.freeze({
  task: sdk.task,
  taskRef: sdk.taskRef,
  TaskError: sdk.TaskError,
  TaskHandle: sdk.TaskHandle,
  NonRetryable: sdk.NonRetryable,
  MessageError: sdk.MessageError,
  HttpError,
  Message: sdk.Message,
  gather: sdk.gather,
  sleep: sdk.sleep,
  current: sdk.current,
  send: sdk.send,
  receive: sdk.receive,
  ask: sdk.ask,
  http,
  fetch,
});

function requireModule(name) {
  if (name === SDK_MODULE) return sdkExports;
  throw new Error(
    `cannot find module ${JSON.stringify(name)}: a program reaches the sandbox bundled ` +
      `into one script, and this module was not bundled`,
  );
}

/** What `read` gives, as text; `fallback` if reading it throws (a thrown
 * value may be a Proxy, or have getters that throw). */
function safely(read, fallback) {
  try {
    const value = read();
    return value === undefined || value === null ? fallback : String(value);
  } catch (_) {
    return fallback;
  }
}

function failure(kind, error, retryable = true) {
  const isError = safely(() => error instanceof Error, "false") === "true";
  const message = isError ? safely(() => error.message, "") : safely(() => show(error), typeof error);
  const name = isError ? safely(() => error.name, "Error") : typeof error;
  const stack = isError ? safely(() => error.stack, "") : "";
  return {
    kind,
    message: message.slice(0, 100000),
    type: name.slice(0, 200),
    traceback: stack ? `${name}: ${message}\n${stack}`.slice(0, 200000) : undefined,
    cause: undefined,
    retryable,
  };
}

/** How a task's exception fails it: the host's kinds a guest may give. */
function taskFailure(error) {
  try {
    return classified(error);
  } catch (_) {
    return failure("exception", "the task threw a value that cannot be read");
  }
}

function classified(error) {
  // (SpiderMonkey throws the string "out of memory" when an allocation fails.)
  if (error === "out of memory" || (error instanceof Error && /^out of memory/.test(error.message))) {
    return failure("memory_limit", new Error("the task ran out of memory (its ram limit)"));
  }
  const retryable = !(error instanceof sdk.NonRetryable) && !(error instanceof HttpError && error.kind === "host_not_allowed");
  if (error instanceof sdk.TaskError) {
    // Left unhandled: fails this task too, naming the original failure once
    // however many callers it went through (as the Python SDK's `unhandled`).
    // (As text: a TaskError the program made itself may hold anything.)
    const text = (value) => safely(() => value, "?").slice(0, 10000);
    const original = error.cause;
    const cause = original
      ? {
          task: text(original.task),
          kind: text(original.kind),
          message: text(original.message),
          via: [error.task, ...(Array.isArray(original.via) ? original.via : [])].slice(0, 16).map(text),
        }
      : { task: text(error.task), kind: text(error.kind), message: text(error.reason), via: [] };
    const shown = cause.via.slice(0, 3).map((task) => JSON.stringify(task)).join(", ") + (cause.via.length > 3 ? ", ..." : "");
    const through = cause.via.length ? ` (through ${shown})` : "";
    const info = failure("exception", error, retryable && error.retryable);
    info.message = `unhandled TaskError: task ${JSON.stringify(cause.task)} failed (${cause.kind})${through}: ${cause.message}`;
    info.cause = cause;
    return info;
  }
  return failure("exception", error, retryable);
}

let loaded = false;

// Where the host's marker goes: random bytes of its own for each instance, by
// which it tells the instance's memory from every other's (to measure it, to
// give back the pages of an idle one). Made in the snapshot, large enough to
// be kept out of the garbage collector's moving heap: at the same place in
// every instance of this build, which the host finds once by the bytes.
const MARKER_SLOT = new Uint8Array(new ArrayBuffer(1 << 16));

function keepMarker(hex) {
  for (let i = 0; i < hex.length / 2 && i < MARKER_SLOT.length; i++) {
    MARKER_SLOT[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  }
}

export const runner = {
  load(program) {
    keepMarker(program.marker);
    if (!loaded) {
      const module = { exports: {} };
      try {
        const evaluate = new Function("module", "exports", "require", program.source.code);
        evaluate(module, module.exports, requireModule);
      } catch (error) {
        throw failure("exception", error, false);
      }
      loaded = true;
    }
    const layout = '"marker": null, "channel": null';
    if (!program.describe) return `{${layout}}`;
    const declared = [...sdk.registry.values()].map((entry) => ({
      name: entry.name,
      function: entry.exported,
      options: entry.options,
    }));
    return `{${layout}, "tasks": ${JSON.stringify(declared)}}`;
  },

  async run(invocationJson, callJson) {
    const invocation = JSON.parse(invocationJson);
    const call = JSON.parse(callJson);
    const entry = sdk.registry.get(invocation.task);
    if (entry === undefined) {
      throw failure("exception", new Error(`no task named ${JSON.stringify(invocation.task)}`), false);
    }
    if (Object.keys(call.kwargs).length) {
      throw failure(
        "bad_arguments",
        new TypeError(
          `task ${JSON.stringify(entry.name)} is a JavaScript function: it takes positional ` +
            `arguments only, not keyword arguments (${Object.keys(call.kwargs).join(", ")})`,
        ),
        false,
      );
    }
    seedRandom(String(invocation.seed));
    sdk.setCurrent(
      Object.freeze({
        id: invocation.task_id,
        name: entry.name,
        attempt: invocation.attempt,
        maxAttempts: invocation.max_attempts,
      }),
    );
    globalThis.process = { env: Object.freeze({ ...(invocation.env ?? {}) }) };
    let result;
    try {
      result = await runUntilSettled(Promise.resolve().then(() => entry.fn(...call.args)));
    } catch (error) {
      throw taskFailure(error);
    } finally {
      abandonAll();
    }
    if (result === undefined) return "null";
    try {
      return toJson(result, `the value task ${JSON.stringify(entry.name)} returned`);
    } catch (error) {
      throw failure("exception", error, false);
    }
  },
};
