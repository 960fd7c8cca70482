// The guest's side of the host: the WIT imports, wrapped so that an error
// result becomes a JS value, and the event loop that waits on the host.
//
// A task's code is asynchronous, and everything it can wait for is the host's:
// a child task, a message, an HTTP request, a timer. So the loop is simple:
// run every JS job that is ready; then fire the timers that are due; then, if
// a host operation is in flight, poll the host for completions (until the next
// timer at most); with none in flight, sleep on the host until the next timer.
// The host's waits free the task's CPU slot, honour its deadline and
// cancellation, and are journaled, so a replay takes the same turns.

import * as clock from "capsule:runtime/clock@0.1.0";
import * as httpImport from "capsule:runtime/http@0.1.0";
import * as messaging from "capsule:runtime/messaging@0.1.0";
import * as operations from "capsule:runtime/operations@0.1.0";
import * as output from "capsule:runtime/output@0.1.0";
import * as tasks from "capsule:runtime/tasks@0.1.0";

// The engine's own timer, kept before the program can replace it: only the
// loop uses it, with a delay of 0, to let every ready job run.
const engineSetTimeout = globalThis.setTimeout;

/** The error payload of an import's `result::err` (a JSON text). */
function errorText(error) {
  if (error !== null && typeof error === "object" && "payload" in error) {
    return error.payload;
  }
  throw error;
}

/** Calls `fn`; an error result comes back as {ok: false, error: parsed JSON}. */
export function attempt(fn) {
  try {
    return { ok: true, value: fn() };
  } catch (error) {
    return { ok: false, error: parseError(errorText(error)) };
  }
}

function parseError(text) {
  try {
    const value = JSON.parse(text);
    if (value !== null && typeof value === "object") return value;
  } catch (_) {
    // (the host always answers JSON; this is only a fallback)
  }
  return { kind: "exception", message: String(text) };
}

/** A class of errors with a `kind` (the host's word for what went wrong). */
export function errorWithKind(name) {
  const ErrorClass = class extends Error {
    constructor(kind, message) {
      super(message);
      this.kind = kind;
    }
  };
  Object.defineProperty(ErrorClass.prototype, "name", { value: name });
  Object.defineProperty(ErrorClass, "name", { value: name });
  return ErrorClass;
}

export function write(stream, text) {
  output.write(stream, text);
}

/** Milliseconds on the host's monotonic clock (journaled, replayed). */
export function monotonicMs() {
  return Number(clock.monotonicNs()) / 1e6;
}

/** The longest wait the host is asked for, in milliseconds (~285,000 years). */
const MAX_WAIT_MS = Number.MAX_SAFE_INTEGER;

/** Optional timeout in seconds (undefined or null: none) -> option<u64> milliseconds. */
export function timeoutMs(seconds, what) {
  if (seconds === undefined || seconds === null) return undefined;
  if (typeof seconds !== "number" || !(seconds >= 0)) {
    throw new TypeError(`${what}: a timeout is a number of seconds >= 0, not ${String(seconds)}`);
  }
  return BigInt(Math.min(Math.ceil(seconds * 1000), MAX_WAIT_MS));
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function wellFormed(text) {
  return typeof text.isWellFormed === "function" ? text.isWellFormed() : !LONE_SURROGATE.test(text);
}

/**
 * `value` as the JSON text the host takes; a TypeError naming `what` if it is
 * not JSON, or holds a string the host cannot take as text (a lone surrogate).
 */
export function toJson(value, what) {
  let text;
  try {
    text = JSON.stringify(value, (key, item) => {
      // (A String object is written as its text: checked as one.)
      const string = item instanceof String ? item.valueOf() : item;
      if ((typeof string === "string" && !wellFormed(string)) || !wellFormed(key)) {
        throw new TypeError("a string holds a lone surrogate (half of a UTF-16 pair), which is not text");
      }
      return item;
    });
  } catch (error) {
    throw new TypeError(`${what} is not JSON: ${error?.message ?? error}`);
  }
  if (text === undefined) throw new TypeError(`${what} is not JSON: ${typeof value}`);
  return text;
}

// -- host operations -------------------------------------------------------

/** Started operations not yet reported: handle -> {resolve, reject, answer}. */
const inFlight = new Map();
/** The handle of each operation's promise, while it is in flight. */
const handles = new WeakMap();

/**
 * Starts a host operation; the promise its completion settles with
 * `answer(ok, payload)`. A refused start settles it at once.
 */
export function startOperation(start, answer) {
  let handle;
  const promise = new Promise((resolve, reject) => {
    try {
      handle = start();
    } catch (error) {
      settleWith(resolve, reject, answer, false, errorText(error));
      return;
    }
    inFlight.set(handle, { resolve, reject, answer });
  });
  if (handle !== undefined) handles.set(promise, handle);
  return promise;
}

/**
 * Stops the operation of a promise startOperation made, if it is still in
 * flight (a timeout won the race): the host stops it, and it never settles.
 */
export function abandonOperation(promise) {
  const handle = handles.get(promise);
  if (handle !== undefined && inFlight.delete(handle)) operations.abandon(handle);
}

function settleWith(resolve, reject, answer, ok, payload) {
  try {
    resolve(answer(ok, payload));
  } catch (error) {
    reject(error);
  }
}

/** Stops every operation still in flight (the attempt ends). */
export function abandonAll() {
  for (const handle of inFlight.keys()) operations.abandon(handle);
  inFlight.clear();
}

// -- timers ----------------------------------------------------------------

const timers = new Map();
let nextTimerId = 1;

/** The longest delay of setTimeout; a longer one (or Infinity) fires at once, as in Node. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The program's setTimeout and setInterval. */
export function setTimer(callback, delay, args, repeat) {
  if (typeof callback !== "function") {
    throw new TypeError("setTimeout/setInterval take a function (strings are not evaluated)");
  }
  let ms = Number(delay);
  if (!(ms >= 0)) ms = 0;
  if (ms > MAX_TIMER_MS) ms = 1;
  return hostTimer(callback, ms, args, repeat);
}

/** A timer of the SDK's own waits: any delay, up to MAX_WAIT_MS. */
export function hostTimer(callback, ms, args = [], repeat = false) {
  const delay = Math.min(Math.max(0, Number(ms) || 0), MAX_WAIT_MS);
  const id = nextTimerId++;
  timers.set(id, { at: monotonicMs() + delay, ms: delay, callback, args, repeat });
  return id;
}

export function clearTimer(id) {
  timers.delete(Number(id));
}

/** The timer due first, or undefined. */
function firstTimer() {
  let first;
  for (const [id, timer] of timers) {
    if (first === undefined || timer.at < first[1].at) first = [id, timer];
  }
  return first;
}

// -- the loop --------------------------------------------------------------

class Deadlock extends Error {}
Object.defineProperty(Deadlock.prototype, "name", { value: "Deadlock" });

function ready() {
  return new Promise((resolve) => engineSetTimeout(resolve, 0));
}

/**
 * Runs the loop until `promise` settles; its value, or throws its reason.
 * An exception thrown by a timer's callback fails the task with it.
 */
export async function runUntilSettled(promise) {
  let state = 0;
  let outcome;
  promise.then(
    (value) => {
      state = 1;
      outcome = value;
    },
    (reason) => {
      state = 2;
      outcome = reason;
    },
  );
  for (;;) {
    await ready(); // every job that is ready has run
    if (state !== 0) break;
    // (The clock is read only with a timer set: each read is a journaled step.)
    const first = firstTimer();
    const now = first === undefined ? 0 : monotonicMs();
    if (first !== undefined && first[1].at <= now) {
      const [id, timer] = first;
      if (timer.repeat) timer.at = now + Math.max(timer.ms, 1);
      else timers.delete(id);
      timer.callback(...timer.args);
      continue;
    }
    const wait =
      first === undefined ? undefined : BigInt(Math.min(Math.ceil(first[1].at - now), MAX_WAIT_MS));
    if (inFlight.size > 0) {
      poll(wait);
    } else if (wait === undefined) {
      throw new Deadlock(
        "deadlock: the task's promise never settles: nothing it awaits can happen " +
          "(no timer, no host operation in flight: a Promise nobody resolves?)",
      );
    } else {
      tasks.sleep(wait);
    }
  }
  if (state === 2) throw outcome;
  return outcome;
}

function poll(timeout) {
  let completions;
  try {
    completions = operations.poll(timeout);
  } catch (error) {
    throw new Error(`waiting for the task's operations failed: ${errorText(error)}`);
  }
  for (const completion of completions) {
    const entry = inFlight.get(completion.handle);
    if (entry === undefined) continue;
    inFlight.delete(completion.handle);
    settleWith(entry.resolve, entry.reject, entry.answer, completion.ok, completion.payload);
  }
}

export { httpImport, messaging, operations, tasks };
