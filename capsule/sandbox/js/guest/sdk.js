// The task SDK of JavaScript and TypeScript programs: what
// `import { task } from "@capsule-run/sdk"` gives them. It mirrors the Python
// SDK (capsule/sdk), with Promises: a task called from another runs as its
// child, in a sandbox of its own, and the call's promise settles with its
// result or rejects with a TaskError.

import {
  abandonOperation,
  attempt,
  clearTimer,
  errorWithKind,
  hostTimer,
  httpImport,
  messaging,
  monotonicMs,
  operations,
  startOperation,
  tasks,
  timeoutMs,
  toJson,
} from "./host.js";

/** The option names of task(), as JS spells them -> as the host knows them. */
export const OPTION_NAMES = {
  name: "name",
  compute: "compute",
  ram: "ram",
  timeout: "timeout",
  maxRetries: "max_retries",
  restart: "restart",
  strategy: "strategy",
  maxRestarts: "max_restarts",
  restartWindow: "restart_window",
  allowedHosts: "allowed_hosts",
  env: "env",
  allowedFiles: "allowed_files",
};

/** Every task the program declared, by name. */
export const registry = new Map();

function describe(value) {
  if (typeof value === "string") return JSON.stringify(value.slice(0, 80));
  if (typeof value === "function") return "a function";
  if (value !== null && typeof value === "object" && typeof value.then === "function") return "a promise";
  try {
    return String(value);
  } catch (_) {
    return typeof value;
  }
}

/** A task failed after all its attempts (or the host refused to start it). */
export class TaskError extends Error {
  constructor(kind, task, message, details = {}) {
    super(`task ${JSON.stringify(task)} failed (${kind}): ${message}`);
    this.kind = kind;
    this.task = task;
    this.reason = message;
    this.traceback = details.traceback ?? null;
    this.attempts = details.attempts ?? null;
    this.retryable = details.retryable ?? true;
    if (details.cause) this.cause = details.cause;
    // The failed task's own stack, where it had one: what a reader of this
    // error wants to see.
    if (this.traceback) this.stack = this.traceback;
  }

  static from(error) {
    return new TaskError(
      String(error.kind ?? "exception"),
      String(error.task ?? "?"),
      String(error.message ?? ""),
      error,
    );
  }
}
Object.defineProperty(TaskError.prototype, "name", { value: "TaskError" });

/** Thrown by a task, fails it at once: no retry can help. */
export class NonRetryable extends Error {}
Object.defineProperty(NonRetryable.prototype, "name", { value: "NonRetryable" });

/** A message, a host timeout, a mailbox: what send/receive/ask can fail with. */
export const MessageError = errorWithKind("MessageError");

function messageError(error) {
  return new MessageError(String(error.kind ?? "error"), String(error.message ?? ""));
}

function callJson(name, args) {
  return toJson({ args, kwargs: {} }, `the arguments to task ${JSON.stringify(name)}`);
}

function body(target, value) {
  return toJson(value, `a message to ${JSON.stringify(target)}`);
}

function outcomes(payload) {
  return JSON.parse(payload).map((item) =>
    item === null ? null : item.ok ? { ok: true, value: item.value } : { ok: false, error: TaskError.from(item.error) },
  );
}

function waitAnswer(ok, payload) {
  if (!ok) throw TaskError.from(JSON.parse(payload));
  return outcomes(payload);
}

/** A child task started with spawn: wait for it, or cancel it. */
export class TaskHandle {
  constructor(id, name) {
    this.id = id;
    this.taskName = name;
    this._outcome = undefined;
  }

  /** The child's result; rejects with its TaskError. */
  result() {
    // (One wait on the host however often it is asked for meanwhile.)
    this._result ??= this._wait();
    return this._result;
  }

  async _wait() {
    if (this._outcome === undefined) {
      const [outcome] = await startOperation(
        () => operations.startWait(JSON.stringify([this.id])),
        waitAnswer,
      );
      this._outcome ??= outcome;
    }
    if (this._outcome.ok) return this._outcome.value;
    throw this._outcome.error;
  }

  then(resolve, reject) {
    return this.result().then(resolve, reject);
  }

  cancel() {
    tasks.cancel(this.id);
  }
}

function spawnTask(name, args, options = {}) {
  const spawnOptions = toJson(
    { actor_name: options.name ?? null, link: Boolean(options.link) },
    `the spawn options of task ${JSON.stringify(name)}`,
  );
  const answer = attempt(() => tasks.spawn(name, callJson(name, args), spawnOptions));
  if (!answer.ok) throw TaskError.from({ task: name, ...answer.error });
  return new TaskHandle(answer.value, name);
}

/**
 * Declares a task: `task({name, compute, ram, timeout, maxRetries, ...}, fn)`.
 * Calling what it returns runs the task as a child of the caller (a promise of
 * its result); `.spawn(...)` starts one and returns its handle; `.map(items)`
 * runs one child per item, concurrently.
 */
export function task(options, fn) {
  if (typeof options === "function" && fn === undefined) {
    fn = options;
    options = {};
  }
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new TypeError(`task() takes an options object first, not ${describe(options)}`);
  }
  if (typeof fn !== "function") {
    throw new TypeError(`task() takes the task's function after its options, not ${describe(fn)}`);
  }
  const declared = {};
  for (const [key, value] of Object.entries(options)) {
    const known = OPTION_NAMES[key];
    if (known === undefined) {
      throw new TypeError(
        `task(): unknown option ${JSON.stringify(key)}; the options are ${Object.keys(OPTION_NAMES).join(", ")}`,
      );
    }
    if (value !== undefined && value !== null) declared[known] = value;
  }
  const name = typeof declared.name === "string" && declared.name ? declared.name : fn.name;
  if (!name) {
    throw new TypeError("task(): give the task a name (the function has none): task({ name: \"...\" }, fn)");
  }
  if (registry.has(name)) {
    throw new TypeError(`task(): two tasks are named ${JSON.stringify(name)}; task names must be unique`);
  }
  declared.name = name;
  registry.set(name, { name, fn, options: declared, exported: fn.name || name });
  return callable(name);
}

/**
 * A task another program of the run declares, by its name: a Python task (or
 * another JS/TS file's) that the program's capsule.toml lists under
 * [program] modules. Call, spawn or map it as a task of this program.
 */
export function taskRef(name) {
  if (typeof name !== "string" || !name) {
    throw new TypeError(`taskRef() takes a task's name, not ${describe(name)}`);
  }
  return callable(name);
}

function callable(name) {
  // (A call is a promise: one the host refused at once rejects too.)
  const call = async (...args) => spawnTask(name, args).result();
  call.spawn = (...args) => spawnTask(name, args);
  call.spawnWith = (options, ...args) => spawnTask(name, args, options);
  call.map = async (items, { returnExceptions = false } = {}) =>
    gather(...Array.from(items, (item) => spawnTask(name, [item])), { returnExceptions });
  Object.defineProperty(call, "taskName", { value: name });
  return call;
}

/**
 * The results of the handles, in order, once all have ended. A failed child
 * rejects with its TaskError, or with `returnExceptions` stands in its place.
 */
export async function gather(...args) {
  let options = {};
  const last = args[args.length - 1];
  if (args.length && !(last instanceof TaskHandle) && last !== null && typeof last === "object" && typeof last.then !== "function") {
    options = args.pop();
  }
  const handles = args;
  for (const handle of handles) {
    if (!(handle instanceof TaskHandle)) {
      throw new TypeError(
        `gather() takes the handles of spawned tasks (task.spawn(...)), not ${describe(handle)}; ` +
          "for promises of task calls, use Promise.all",
      );
    }
  }
  if (handles.length === 0) return [];
  const pending = [...new Set(handles.filter((handle) => handle._outcome === undefined))];
  if (pending.length) {
    const ended = await startOperation(
      () => operations.startWait(JSON.stringify(pending.map((handle) => handle.id))),
      waitAnswer,
    );
    pending.forEach((handle, index) => {
      handle._outcome ??= ended[index];
    });
  }
  return handles.map((handle) => {
    if (handle._outcome.ok) return handle._outcome.value;
    if (options.returnExceptions) return handle._outcome.error;
    throw handle._outcome.error;
  });
}

/** Waits `seconds` on the host (the task's CPU slot free meanwhile). */
export function sleep(seconds) {
  if (typeof seconds !== "number" || !(seconds >= 0)) {
    return Promise.reject(new TypeError(`sleep() takes a number of seconds >= 0, not ${describe(seconds)}`));
  }
  return new Promise((resolve) => hostTimer(resolve, seconds * 1000));
}

let info = null;

export function setCurrent(value) {
  info = value;
}

/** The running task: {id, name, attempt, maxAttempts}. */
export function current() {
  if (info === null) throw new Error("current() is only known inside a task");
  return info;
}

function targetOf(target) {
  if (target instanceof TaskHandle) return target.id;
  if (typeof target === "string" && target) return target;
  throw new TypeError(`a message's target is a task id, a registered name or a TaskHandle, not ${describe(target)}`);
}

/** Sends `value` to a task (its id or registered name); waits while its mailbox is full. */
export async function send(target, value, { timeout } = {}) {
  const to = targetOf(target);
  const answer = attempt(() => messaging.send(to, body(to, value), timeoutMs(timeout, "send")));
  if (!answer.ok) throw messageError(answer.error);
}

/** A received message: its body, who sent it, and `reply()` for an ask. */
export class Message {
  constructor(envelope) {
    this.id = envelope.id;
    this.sender = envelope.sender;
    this.body = JSON.parse(envelope.body);
    this.expectsReply = envelope.expectsReply;
  }

  reply(value) {
    const answer = attempt(() => messaging.reply(this.id, body(this.sender, value)));
    if (!answer.ok) throw messageError(answer.error);
  }
}

/** The oldest message in this task's mailbox; waits up to `timeout` seconds for one. */
export async function receive({ timeout } = {}) {
  const limit = timeoutMs(timeout, "receive");
  const deadline = limit === undefined ? undefined : monotonicMs() + Number(limit);
  for (;;) {
    const answer = attempt(() => messaging.receive(0n));
    if (answer.ok) return new Message(answer.value[0]);
    if (answer.error.kind !== "receive_timeout") throw messageError(answer.error);
    if (deadline !== undefined && monotonicMs() >= deadline) {
      throw messageError({ kind: "receive_timeout", message: `no message arrived within ${timeout}s` });
    }
    const arrived = startOperation(() => operations.startReceive(), (ok, payload) => {
      if (!ok) throw messageError(JSON.parse(payload));
    });
    if (deadline === undefined) {
      await arrived;
    } else {
      let timer;
      const expired = new Promise((resolve) => {
        timer = hostTimer(resolve, deadline - monotonicMs());
      });
      try {
        await Promise.race([arrived, expired]);
      } finally {
        clearTimer(timer);
        abandonOperation(arrived);
      }
    }
  }
}

/** Sends `value` and waits for the reply. */
export async function ask(target, value, { timeout } = {}) {
  const to = targetOf(target);
  const text = body(to, value);
  const limit = timeoutMs(timeout, "ask"); // (checked before anything is sent)
  const reply = startOperation(
    () => operations.startAsk(to, text),
    (ok, payload) => {
      const parsed = JSON.parse(payload);
      if (!ok) throw messageError(parsed);
      return parsed;
    },
  );
  if (limit === undefined) return reply;
  let timer;
  const expired = new Promise((_, reject) => {
    timer = hostTimer(
      () => reject(messageError({ kind: "receive_timeout", message: `no reply from ${JSON.stringify(to)} within ${timeout}s` })),
      Number(limit),
    );
  });
  try {
    return await Promise.race([reply, expired]);
  } finally {
    clearTimer(timer);
    abandonOperation(reply);
  }
}

export { httpImport };
