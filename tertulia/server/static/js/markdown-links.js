// Links for the Markdown renderer: the scheme check every href goes through (absolute http, https and
// mailto only), the anchor it builds, and the bounded scans that find link targets and bare URLs.

import { el } from "./markdown-dom.js";

export const ESCAPABLE = new Set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~");
export const WS = /\s/;
const URL_TRAIL = "?!.,:*_~'\";";
const MAX_URL = 2048;
const MAX_TITLE = 1024;

const PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

/** The normalized URL if it is absolute http(s) or mailto, else null (javascript:, data:, relative…). */
export function safeUrl(raw) {
  let url;
  try {
    url = new URL(raw.trim());
  } catch {
    return null;
  }
  return PROTOCOLS.has(url.protocol) ? url.href : null;
}

/** An <a> that opens in a new tab and passes nothing to the target page. */
export function anchor(href, title) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  if (title) a.title = title;
  return a;
}

const unbackslash = (s) => s.replace(/\\([!-/:-@[-`{-~])/g, "$1");

function skipSpace(src, j) {
  while (j < src.length && WS.test(src[j])) j++;
  return j;
}

// `(destination "title")` after a `]`, with bounded scans (length and paren-depth caps).
export function linkTarget(src, j) {
  const n = src.length;
  j = skipSpace(src, j);
  let url;
  let k = j;
  if (src[j] === "<") {
    k++;
    while (k < n && k - j < MAX_URL && src[k] !== ">" && src[k] !== "<" && src[k] !== "\n") k += src[k] === "\\" ? 2 : 1;
    if (src[k] !== ">") return null;
    url = src.slice(j + 1, k++);
  } else {
    let depth = 0;
    for (; k < n && k - j <= MAX_URL; k++) {
      const c = src.charCodeAt(k);
      if (c <= 32) break;
      if (c === 92 && ESCAPABLE.has(src[k + 1])) k++;
      else if (c === 40 && ++depth > 32) return null;
      else if (c === 41 && depth-- === 0) break;
    }
    if (depth > 0 || k - j > MAX_URL) return null;
    url = src.slice(j, k);
  }
  let t = skipSpace(src, k);
  let title = "";
  const quote = src[t];
  if (t > k && (quote === '"' || quote === "'" || quote === "(")) {
    const close = quote === "(" ? ")" : quote;
    let e = t + 1;
    for (; e < n && src[e] !== close; e += src[e] === "\\" ? 2 : 1) {
      if (e - t > MAX_TITLE || (quote === "(" && src[e] === "(")) return null;
    }
    if (e >= n) return null;
    title = unbackslash(src.slice(t + 1, e));
    t = skipSpace(src, e + 1);
  }
  return src[t] === ")" ? { url: unbackslash(url), title, end: t + 1 } : null;
}

// A bare http(s):// or www. URL (GFM autolink extension), with trailing punctuation left outside.
// Inside link text (`[https://a](https://b)`) the URL also stops at "]". The scan is capped, since a
// candidate that fails to parse is scanned again from its next "://".
export function bareUrl(src, start, bodyFrom, www, inBrackets) {
  const limit = Math.min(src.length, start + MAX_URL);
  let end = bodyFrom;
  while (end < limit && !WS.test(src[end]) && src[end] !== "<" && !(inBrackets && src[end] === "]")) end++;
  if (end === limit && limit < src.length && !WS.test(src[end])) return null;
  let opens = 0;
  let closes = 0;
  for (let p = start; p < end; p++) {
    if (src[p] === "(") opens++;
    else if (src[p] === ")") closes++;
  }
  while (end > bodyFrom) {
    const last = src[end - 1];
    if (URL_TRAIL.includes(last)) end--;
    else if (last === ")" && closes > opens) {
      end--;
      closes--;
    } else break;
  }
  if (end <= bodyFrom) return null;
  const raw = src.slice(start, end);
  const href = safeUrl(www ? `http://${raw}` : raw);
  return href ? { href, raw, end } : null;
}
