// Types of "@capsule-run/sdk", the task SDK of TypeScript and JavaScript
// programs run by Capsule (`capsule run main.ts`). The SDK is built into the
// sandbox's runtime; these declarations are for editors and `tsc`.

/** A JSON value: what crosses between tasks (arguments, results, messages). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface TaskOptions {
  /** Task identifier (defaults to the function's name). */
  name?: string;
  /** "LOW", "MEDIUM", "HIGH", or an amount of fuel. */
  compute?: "LOW" | "MEDIUM" | "HIGH" | string | number;
  /** Memory cap: "64MB", "2GB", or a number of bytes. */
  ram?: string | number;
  /** Wall-clock limit: "500ms", "30s", "5m", "1h", or seconds. */
  timeout?: string | number;
  /** Attempts after the first failure (default 1). */
  maxRetries?: number;
  /** As a spawned child: "transient" (default), "permanent" or "temporary". */
  restart?: "transient" | "permanent" | "temporary";
  /** As a parent: "one_for_one" (default), "one_for_all" or "rest_for_one". */
  strategy?: "one_for_one" | "one_for_all" | "rest_for_one";
  /** More restarts of its children than this within restartWindow fail it (default 3 in 5 s). */
  maxRestarts?: number;
  restartWindow?: string | number;
  /** Hosts it may reach with fetch and http: "api.example.com", "*.example.com", "*". */
  allowedHosts?: string[];
  /** Host environment variables it can read (process.env). */
  env?: string[];
  /** Directories of the program it may read ("data") or write ("out:rw"). */
  allowedFiles?: string[];
}

export interface SpawnOptions {
  /** Register the child under this name for the run (for send and ask). */
  name?: string;
  /** The child's failure fails the caller at once (OTP's link). */
  link?: boolean;
}

/** A declared task: calling it runs it as a child of the caller, in its own sandbox. */
export interface Task<A extends unknown[], R> {
  (...args: A): Promise<Awaited<R>>;
  /** Starts it as a concurrent child; its handle at once. */
  spawn(...args: A): TaskHandle<Awaited<R>>;
  /** As spawn, registering the child under a name or linking it. */
  spawnWith(options: SpawnOptions, ...args: A): TaskHandle<Awaited<R>>;
  /** One child per item, concurrently; the results in input order. */
  map(
    items: Iterable<A[0]>,
    options?: { returnExceptions?: boolean },
  ): Promise<Awaited<R>[]>;
  readonly taskName: string;
}

/** Declares a task: `export const main = task({ name: "main" }, () => ...)`. */
export function task<A extends unknown[], R>(options: TaskOptions, fn: (...args: A) => R): Task<A, R>;
export function task<A extends unknown[], R>(fn: (...args: A) => R): Task<A, R>;

/**
 * A task another program of the run declares (a Python task, say), by its
 * name: the program's capsule.toml lists that program under [program] modules.
 */
export function taskRef<A extends unknown[] = unknown[], R = unknown>(name: string): Task<A, R>;

/** A child started with spawn: await it (or its result()), or cancel it. */
export class TaskHandle<R> implements PromiseLike<R> {
  readonly id: string;
  readonly taskName: string;
  result(): Promise<R>;
  then<T1 = R, T2 = never>(
    onfulfilled?: ((value: R) => T1 | PromiseLike<T1>) | null,
    onrejected?: ((reason: unknown) => T2 | PromiseLike<T2>) | null,
  ): PromiseLike<T1 | T2>;
  cancel(): void;
}

/** The results of the handles, in order, once all have ended. */
export function gather(...handles: TaskHandle<unknown>[]): Promise<unknown[]>;
export function gather(
  ...args: [...TaskHandle<unknown>[], { returnExceptions?: boolean }]
): Promise<unknown[]>;

/** A task failed after all its attempts (or the host refused to start it). */
export class TaskError extends Error {
  /** exception, timeout, fuel_exhausted, memory_limit, trap, cancelled, child_failed, ... */
  readonly kind: string;
  /** The task that failed. */
  readonly task: string;
  /** Its failure's message (`message` says which task failed, and how). */
  readonly reason: string;
  /** The failed task's own stack, where it had one (also `stack`). */
  readonly traceback: string | null;
  /** False when no retry could help (so none was made). */
  readonly retryable: boolean;
  readonly cause?: { task: string; kind: string; message: string; via: string[] };
}

/** Thrown by a task, fails it at once: no retry can help. */
export class NonRetryable extends Error {}

/** send, receive or ask failed: kind receive_timeout, too_large, no_such_actor, ... */
export class MessageError extends Error {
  readonly kind: string;
}

export class Message {
  readonly id: string;
  /** The sender's task id. */
  readonly sender: string;
  readonly body: Json;
  readonly expectsReply: boolean;
  reply(value: Json): void;
}

export function send(target: string | TaskHandle<unknown>, value: Json, options?: { timeout?: number }): Promise<void>;
export function receive(options?: { timeout?: number }): Promise<Message>;
export function ask(target: string | TaskHandle<unknown>, value: Json, options?: { timeout?: number }): Promise<Json>;

/** Waits `seconds` on the host (the task's CPU slot free meanwhile). */
export function sleep(seconds: number): Promise<void>;

export interface TaskInfo {
  readonly id: string;
  readonly name: string;
  readonly attempt: number;
  readonly maxAttempts: number;
}

/** The running task. */
export function current(): TaskInfo;

/** An HTTP request the host refused or could not complete. */
export class HttpError extends Error {
  /** host_not_allowed, timeout, connection_failed, too_large, invalid_request. */
  readonly kind: string;
}

export interface HttpOptions {
  headers?: Record<string, string>;
  params?: Record<string, string>;
  json?: unknown;
  data?: string | Uint8Array;
  /** Seconds (default 30). */
  timeout?: number;
}

export interface HttpResponse {
  readonly statusCode: number;
  readonly url: string;
  readonly content: Uint8Array;
  ok(): boolean;
  text(): string;
  json(): any;
}

/** HTTP through the host, to the hosts the task is granted (allowedHosts). */
export const http: {
  request(method: string, url: string, options?: HttpOptions): Promise<HttpResponse>;
  get(url: string, options?: HttpOptions): Promise<HttpResponse>;
  post(url: string, options?: HttpOptions): Promise<HttpResponse>;
  put(url: string, options?: HttpOptions): Promise<HttpResponse>;
  patch(url: string, options?: HttpOptions): Promise<HttpResponse>;
  delete(url: string, options?: HttpOptions): Promise<HttpResponse>;
  head(url: string, options?: HttpOptions): Promise<HttpResponse>;
};
