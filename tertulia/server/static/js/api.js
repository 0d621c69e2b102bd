// The server's /api and /v1 as the page uses them: JSON in and out, OpenAI-style errors as exceptions,
// the CSRF token on every change, and replies read as server-sent events from a fetch stream (so Stop
// is an abort: the server sees the connection close and stops generating).

export const MAX_UPLOAD_BYTES = 4 * 1024 * 1024; // the server's body limit (413 beyond it)

let csrfToken = null;
// A server started with --api-key (and no accounts) guards /api with its keys: the page asks for
// one once and keeps it in this browser.
let apiKey = localStorage.getItem("tertulia.key");

export function setCsrfToken(token) {
  csrfToken = token || null;
}

export function setApiKey(key) {
  apiKey = key || null;
  if (apiKey) localStorage.setItem("tertulia.key", apiKey);
  else localStorage.removeItem("tertulia.key");
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

function headers(method, hasBody) {
  const result = { Accept: "application/json" };
  if (hasBody) result["Content-Type"] = "application/json";
  if (csrfToken && method !== "GET") result["X-CSRF-Token"] = csrfToken;
  if (apiKey) result.Authorization = `Bearer ${apiKey}`;
  return result;
}

export async function api(method, path, body, options = {}) {
  const hasBody = body !== undefined;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(method, hasBody),
      body: hasBody ? JSON.stringify(body) : undefined,
      credentials: "same-origin",
      signal: options.signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The server cannot be reached.", "offline");
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

/** Fetch a file from the API (with the same credentials) and hand it to the browser as a download. */
export async function download(path, filename) {
  const response = await fetch(path, { headers: headers("GET", false), credentials: "same-origin" });
  if (!response.ok) throw await errorFrom(response);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** POST a reply request and call onEvent for each event until `done` or an abort. */
export async function streamReply(conversationId, body, onEvent, signal) {
  let response;
  try {
    response = await fetch(`/api/conversations/${encodeURIComponent(conversationId)}/reply`, {
      method: "POST",
      headers: headers("POST", true),
      body: JSON.stringify(body),
      credentials: "same-origin",
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "The server cannot be reached.", "offline");
  }
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
        }
      }
    }
  } catch (error) {
    reader.cancel().catch(() => {}); // the server stops generating for a reader that is gone
    if (error.name === "AbortError") throw error;
    throw error instanceof ApiError || error instanceof SyntaxError ? error : new ApiError(0, "The reply was cut off.", "offline");
  }
}
