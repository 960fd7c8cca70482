// HTTP for tasks: `http.get(...)` (as the Python SDK's capsule.http) and a
// standard `fetch`, both performed by the host (wit/capsule.wit, http): only to
// the hosts the task was granted, journaled, with secrets redacted.

import { errorWithKind, operations, startOperation, toJson } from "./host.js";

const DEFAULT_TIMEOUT_S = 30;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An HTTP request the host refused or could not complete. */
export const HttpError = errorWithKind("HttpError");

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function bodyBytes(body) {
  if (body === undefined || body === null) return new Uint8Array(0);
  if (typeof body === "string") return encoder.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  if (body instanceof URLSearchParams) return encoder.encode(body.toString());
  throw new TypeError(`an HTTP body is a string, bytes or URLSearchParams, not ${typeof body}`);
}

/** Headers, as the Fetch standard has them (names case-insensitive). */
export class Headers {
  constructor(init) {
    this._list = [];
    if (init instanceof Headers) init = init._list;
    if (Array.isArray(init)) for (const [name, value] of init) this.append(name, value);
    else if (init) for (const name of Object.keys(init)) this.append(name, init[name]);
  }
  append(name, value) {
    this._list.push([String(name), String(value)]);
  }
  set(name, value) {
    this.delete(name);
    this.append(name, value);
  }
  get(name) {
    const wanted = String(name).toLowerCase();
    const values = this._list.filter(([key]) => key.toLowerCase() === wanted).map(([, value]) => value);
    return values.length ? values.join(", ") : null;
  }
  has(name) {
    return this.get(name) !== null;
  }
  delete(name) {
    const wanted = String(name).toLowerCase();
    this._list = this._list.filter(([key]) => key.toLowerCase() !== wanted);
  }
  forEach(callback) {
    for (const [name, value] of this._list) callback(value, name, this);
  }
  *entries() {
    yield* this._list.map(([name, value]) => [name.toLowerCase(), value]);
  }
  [Symbol.iterator]() {
    return this.entries();
  }
}

/** A response, as the Fetch standard has it (the body already read). */
export class Response {
  constructor(body, init = {}) {
    this._bytes = bodyBytes(body);
    this.status = init.status ?? 200;
    this.statusText = init.statusText ?? "";
    this.headers = new Headers(init.headers);
    this.url = init.url ?? "";
    this.ok = this.status >= 200 && this.status < 300;
    this.bodyUsed = false;
  }
  async arrayBuffer() {
    this.bodyUsed = true;
    return this._bytes.slice().buffer;
  }
  async bytes() {
    this.bodyUsed = true;
    return this._bytes.slice();
  }
  async text() {
    this.bodyUsed = true;
    return decoder.decode(this._bytes);
  }
  async json() {
    return JSON.parse(await this.text());
  }
}

function request(payload) {
  let text;
  try {
    text = toJson(payload, "the request");
  } catch (error) {
    return Promise.reject(new HttpError("invalid_request", error.message));
  }
  return startOperation(
    () => operations.startHttp(text),
    (ok, answer) => {
      const value = JSON.parse(answer);
      if (!ok) throw new HttpError(String(value.kind), String(value.message));
      return value;
    },
  );
}

function payload(method, url, headers, body, timeout) {
  if (timeout !== undefined && !(typeof timeout === "number" && timeout > 0)) {
    throw new HttpError("invalid_request", `timeout is a positive number of seconds, not ${String(timeout)}`);
  }
  return {
    method: String(method).toUpperCase(),
    url: String(url),
    headers: headers._list,
    body: toBase64(body),
    timeout_s: timeout ?? DEFAULT_TIMEOUT_S,
  };
}

/** The standard fetch, through the host. (No streaming: bodies are read whole.) */
export async function fetch(resource, init = {}) {
  const url = typeof resource === "string" ? resource : resource instanceof URL ? resource.href : resource.url;
  const headers = new Headers(init.headers ?? resource?.headers);
  const bytes = bodyBytes(init.body);
  if (typeof init.body === "string" && !headers.has("content-type")) {
    headers.set("content-type", "text/plain;charset=UTF-8");
  }
  if (init.signal?.aborted) throw init.signal.reason ?? new Error("aborted");
  const reply = await request(payload(init.method ?? "GET", url, headers, bytes, undefined));
  return new Response(fromBase64(reply.body), {
    status: reply.status,
    headers: reply.headers,
    url: reply.url,
  });
}

/** The Python SDK's response: `statusCode`, `ok()`, `text()`, `json()`. */
class HttpResponse {
  constructor(reply) {
    this.statusCode = reply.status;
    this.status = reply.status;
    this.url = reply.url;
    this.headers = new Headers(reply.headers);
    this.content = fromBase64(reply.body);
  }
  ok() {
    return this.statusCode >= 200 && this.statusCode < 300;
  }
  text() {
    return decoder.decode(this.content);
  }
  json() {
    return JSON.parse(this.text());
  }
}

async function send(method, url, options = {}) {
  const headers = new Headers(options.headers);
  let body = options.data;
  if (options.json !== undefined) {
    if (body !== undefined) throw new HttpError("invalid_request", "give json or data, not both");
    body = JSON.stringify(options.json);
    if (!headers.has("content-type")) headers.set("Content-Type", "application/json");
  }
  let target = String(url);
  if (options.params) {
    const query = new URLSearchParams(options.params).toString();
    target += (target.includes("?") ? "&" : "?") + query;
  }
  return new HttpResponse(await request(payload(method, target, headers, bodyBytes(body), options.timeout)));
}

export const http = Object.freeze({
  request: send,
  get: (url, options) => send("GET", url, options),
  post: (url, options) => send("POST", url, options),
  put: (url, options) => send("PUT", url, options),
  patch: (url, options) => send("PATCH", url, options),
  delete: (url, options) => send("DELETE", url, options),
  head: (url, options) => send("HEAD", url, options),
  HttpError,
});
