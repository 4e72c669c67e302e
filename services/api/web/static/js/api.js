// The public REST API, as any frontend calls it: JSON in and out, the error shape
// {"error": {"type", "message", "param"}}, `Authorization: Bearer <key>` when the gateway has keys,
// images as blobs (they need the header too), and job events over SSE read with fetch().

import { SSEParser } from "./sse.js";

const KEY_STORAGE = "latentd.apiKey";
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// Paths resolve against the page's own URL, so a gateway mounted under a prefix still works.
const base = new URL(".", document.baseURI);
export const apiURL = (path) => new URL(String(path).replace(/^\//, ""), base);

export const getKey = () => sessionStorage.getItem(KEY_STORAGE) || "";
export const setKey = (key) => sessionStorage.setItem(KEY_STORAGE, key);
export const clearKey = () => sessionStorage.removeItem(KEY_STORAGE);

export class ApiError extends Error {
  constructor(status, error = {}) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || "error";
    this.param = error.param ?? null;
    this.retryAfter = null;
  }
}

// Seeds go up to 2**63-1, past what a JS number holds exactly: they travel as BigInt on the way out
// and stay strings on the way in.
const BIG = "__latentd_bigint__";
export function toJSON(body) {
  const text = JSON.stringify(body, (_, v) => (typeof v === "bigint" ? `${BIG}${v}` : v));
  return text.replace(new RegExp(`"${BIG}(-?\\d+)"`, "g"), "$1");
}
export function parseJSON(text) {
  return JSON.parse(text.replace(/"(seed|noise_seed)":\s*(-?\d{16,})/g, '"$1":"$2"'));
}

function headers(extra = {}) {
  const h = new Headers(extra);
  const key = getKey();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

async function errorFrom(response) {
  let error = {};
  try {
    error = parseJSON(await response.text()).error || {};
  } catch {
    error = { message: `${response.status} ${response.statusText}` };
  }
  const err = new ApiError(response.status, error);
  err.retryAfter = response.headers.get("Retry-After");
  if (response.status === 401) {
    window.dispatchEvent(new CustomEvent("latentd:unauthorized", { detail: err.message }));
  }
  return err;
}

/** JSON request; throws ApiError with the server's type, message and param. */
export async function request(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = toJSON(body);
  const response = await fetch(apiURL(path), init);
  if (!response.ok) throw await errorFrom(response);
  const text = await response.text();
  return text ? parseJSON(text) : null;
}

/** An image or frame behind auth, as a Blob. */
export async function fetchBlob(path, { signal } = {}) {
  const response = await fetch(apiURL(path), { headers: headers(), signal });
  if (!response.ok) throw await errorFrom(response);
  return response.blob();
}

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    });
  });

/**
 * Follow a job's events until a terminal one; calls onEvent(name, data, id) for each.
 * Reconnects after a dropped connection with Last-Event-ID, as EventSource would. Returns the terminal event's name.
 */
export async function streamEvents(jobId, onEvent, { signal, maxRetries = 8 } = {}) {
  let lastId = null;
  let retryMs = 1000;
  let failures = 0;
  for (;;) {
    const h = headers({ Accept: "text/event-stream" });
    if (lastId) h.set("Last-Event-ID", lastId);
    try {
      const response = await fetch(apiURL(`v1/jobs/${encodeURIComponent(jobId)}/events`), {
        headers: h,
        signal,
        cache: "no-store",
      });
      if (!response.ok) throw await errorFrom(response);
      const parser = new SSEParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const event of parser.push(value)) {
          failures = 0;
          if (event.id) lastId = event.id;
          onEvent(event.event, event.data ? parseJSON(event.data) : {}, event.id);
          if (TERMINAL.has(event.event)) {
            reader.cancel().catch(() => {});
            return event.event;
          }
        }
        if (parser.retry !== null) retryMs = parser.retry;
      }
    } catch (error) {
      if (signal?.aborted || error instanceof ApiError) throw error;
      // a network error: reconnect below
    }
    failures += 1;
    if (failures > maxRetries) throw new Error("lost the event stream and could not reconnect");
    await sleep(retryMs, signal);
  }
}
