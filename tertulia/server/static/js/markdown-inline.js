// Inline Markdown for markdown.js: emphasis, strong, strike, code spans, links, autolinks, escapes,
// entities and line breaks. The text is parsed into a small linked list of nodes (CommonMark's
// delimiter algorithm, kept linear by its openers-bottom bound) and then built into DOM with
// createElement from a fixed list of tags and createTextNode: no input is ever parsed as HTML.

import { el } from "./markdown-dom.js";
import { anchor, bareUrl, ESCAPABLE, linkTarget, safeUrl, WS } from "./markdown-links.js";

const PUNCT = /[\p{P}\p{S}]/u;
const AUTOLINK = /<(?:([A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*)|([\w.!#$%&'*+/=?^`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+))>/y;
const ENTITY = /&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});/y;
const NAMED = {
  amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0", copy: "©", reg: "®", trade: "™",
  hellip: "…", mdash: "—", ndash: "–", laquo: "«", raquo: "»", times: "×", divide: "÷", deg: "°",
  plusmn: "±", middot: "·", bull: "•", euro: "€", larr: "←", rarr: "→", ne: "≠", le: "≤", ge: "≥",
};
const URL_BEFORE = /[\s*_~("']/;
const MAX_DEPTH = 20;

// Characters that may start something; everything else is skipped in one comparison.
const SPECIAL = new Uint8Array(128);
for (const c of "\\`*_~[]!<\n:.&") SPECIAL[c.charCodeAt(0)] = 1;

const text = (s) => ({ k: "text", s, next: null, prev: null });

function append(st, node) {
  node.prev = st.tail;
  st.tail.next = node;
  st.tail = node;
}

function unlink(st, node) {
  node.prev.next = node.next;
  if (node.next) node.next.prev = node.prev;
  else st.tail = node.prev;
}

function decodeEntity(name) {
  if (name[0] !== "#") return Object.hasOwn(NAMED, name) ? NAMED[name] : null;
  const code = name[1] === "x" || name[1] === "X" ? parseInt(name.slice(2), 16) : parseInt(name.slice(1), 10);
  const bad = code === 0 || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff);
  return String.fromCodePoint(bad ? 0xfffd : code);
}

// The next backtick run of exactly `len` after `from`: an index built once per text, read with cursors
// that only move forward, so many unmatched runs cost linear time.
function closingTicks(st, src, len, from) {
  if (!st.ticks) {
    st.ticks = new Map();
    for (let p = src.indexOf("`"); p >= 0; ) {
      let q = p;
      while (src.charCodeAt(q) === 96) q++;
      let entry = st.ticks.get(q - p);
      if (!entry) st.ticks.set(q - p, (entry = { at: [], k: 0 }));
      entry.at.push(p);
      p = src.indexOf("`", q);
    }
  }
  const entry = st.ticks.get(len);
  if (!entry) return -1;
  while (entry.k < entry.at.length && entry.at[entry.k] < from) entry.k++;
  return entry.k < entry.at.length ? entry.at[entry.k] : -1;
}

function codeText(raw) {
  const s = raw.replace(/\n/g, " ");
  return s.length > 2 && s[0] === " " && s[s.length - 1] === " " && /[^ ]/.test(s) ? s.slice(1, -1) : s;
}

function wrap(open, close, k) {
  const first = open.next;
  const last = close.prev;
  const node = { k, first: first === close ? null : first, next: close, prev: open };
  if (node.first) {
    first.prev = null;
    last.next = null;
  }
  open.next = node;
  close.prev = node;
}

// CommonMark "process emphasis" over the delimiters above `bottom` (null: all of them).
function processEmphasis(st, bottom) {
  const openersBottom = new Map();
  let cur = bottom ? bottom.dnext : st.dhead;
  while (cur) {
    if (!cur.canClose) {
      cur = cur.dnext;
      continue;
    }
    const key = `${cur.ch}${cur.canOpen ? 1 : 0}${cur.orig % 3}`;
    const floor = openersBottom.has(key) ? openersBottom.get(key) : bottom;
    let open = cur.dprev;
    for (; open && open !== floor; open = open.dprev) {
      if (open.ch !== cur.ch || !open.canOpen) continue;
      const odd = (open.canClose || cur.canOpen) && (open.orig + cur.orig) % 3 === 0;
      if (!odd || (open.orig % 3 === 0 && cur.orig % 3 === 0)) break;
    }
    if (open && open !== floor) {
      const use = cur.ch === "~" || (open.n >= 2 && cur.n >= 2) ? 2 : 1;
      open.n -= use;
      cur.n -= use;
      open.s = open.s.slice(0, open.n);
      cur.s = cur.s.slice(0, cur.n);
      wrap(open, cur, cur.ch === "~" ? "del" : use === 2 ? "strong" : "em");
      open.dnext = cur;
      cur.dprev = open;
      if (open.n === 0) {
        removeDelim(st, open);
        unlink(st, open);
      }
      if (cur.n === 0) {
        const next = cur.dnext;
        removeDelim(st, cur);
        unlink(st, cur);
        cur = next;
      }
    } else {
      openersBottom.set(key, cur.dprev);
      const next = cur.dnext;
      if (!cur.canOpen) removeDelim(st, cur);
      cur = next;
    }
  }
  if (bottom) {
    bottom.dnext = null;
    st.dtail = bottom;
  } else st.dhead = st.dtail = null;
}

function removeDelim(st, d) {
  if (d.dprev) d.dprev.dnext = d.dnext;
  else st.dhead = d.dnext;
  if (d.dnext) d.dnext.dprev = d.dprev;
  else st.dtail = d.dprev;
}

// A `]`: a link or image if the nearest open bracket is live and a safe target follows; else -1.
function closeBracket(st, src, i) {
  const stack = st.brackets;
  if (!stack.length) return -1;
  const open = stack.pop();
  // Openers below linkFloor were open when a link closed: a link may not contain another link.
  const inactive = !open.image && stack.length < st.linkFloor;
  st.linkFloor = Math.min(st.linkFloor, stack.length);
  const target = !inactive && src.charCodeAt(i + 1) === 40 ? linkTarget(src, i + 2) : null;
  const href = target && safeUrl(target.url);
  if (!href) return -1;
  processEmphasis(st, open.dbottom);
  const node = { k: open.image ? "img" : "link", href, title: target.title, first: open.node.next, next: null };
  node.prev = open.node.prev;
  if (node.first) node.first.prev = null;
  node.prev.next = node;
  st.tail = node;
  if (!open.image) st.linkFloor = stack.length;
  return target.end;
}

const autolink = (href, label) => ({ k: "link", href, title: "", first: text(label), next: null, prev: null });

function parse(src) {
  const head = text("");
  const st = { head, tail: head, dhead: null, dtail: null, brackets: [], linkFloor: 0, ticks: null };
  const n = src.length;
  let i = 0;
  let pend = 0;
  const flush = (to) => {
    if (to > pend) append(st, text(src.slice(pend, to)));
  };
  const emit = (node, end, from = i) => {
    flush(from);
    append(st, node);
    i = pend = end;
  };
  while (i < n) {
    const c = src.charCodeAt(i);
    if (c < 128 && !SPECIAL[c]) {
      i++;
      continue;
    }
    if (c === 92) {
      const d = src[i + 1];
      if (d === "\n") {
        flush(i);
        i = pend = i + 1;
      } else if (ESCAPABLE.has(d)) emit(text(d), i + 2);
      else i++;
    } else if (c === 96) {
      let r = 1;
      while (src.charCodeAt(i + r) === 96) r++;
      const close = closingTicks(st, src, r, i + r);
      if (close < 0) i += r;
      else emit({ k: "code", s: codeText(src.slice(i + r, close)) }, close + r);
    } else if (c === 42 || c === 95 || c === 126) {
      let r = 1;
      while (src.charCodeAt(i + r) === c) r++;
      if (c === 126 && r !== 2) {
        i += r;
        continue;
      }
      const before = i > 0 ? src[i - 1] : " ";
      const after = i + r < n ? src[i + r] : " ";
      const wsB = WS.test(before);
      const wsA = WS.test(after);
      const pB = PUNCT.test(before);
      const pA = PUNCT.test(after);
      const left = !wsA && (!pA || wsB || pB);
      const right = !wsB && (!pB || wsA || pA);
      const ch = src[i];
      const node = text(src.slice(i, i + r));
      Object.assign(node, { ch, n: r, orig: r, canOpen: left, canClose: right, dprev: null, dnext: null });
      if (ch === "_") {
        node.canOpen = left && (!right || pB);
        node.canClose = right && (!left || pA);
      }
      emit(node, i + r);
      if (node.canOpen || node.canClose) {
        node.dprev = st.dtail;
        if (st.dtail) st.dtail.dnext = node;
        else st.dhead = node;
        st.dtail = node;
      }
    } else if (c === 91 || (c === 33 && src.charCodeAt(i + 1) === 91)) {
      const image = c === 33;
      const node = text(image ? "![" : "[");
      st.brackets.push({ node, image, dbottom: st.dtail });
      emit(node, i + (image ? 2 : 1));
    } else if (c === 93) {
      flush(i);
      pend = i;
      const end = closeBracket(st, src, i);
      if (end < 0) emit(text("]"), i + 1);
      else i = pend = end;
    } else if (c === 60) {
      AUTOLINK.lastIndex = i;
      const m = AUTOLINK.exec(src);
      const href = m && safeUrl(m[1] ?? `mailto:${m[2]}`);
      if (href) emit(autolink(href, m[1] ?? m[2]), AUTOLINK.lastIndex);
      else i++;
    } else if (c === 10) {
      emit({ k: "br" }, i + 1);
    } else if (c === 58 && src.startsWith("//", i + 1)) {
      const s = i >= 5 && /^https$/i.test(src.slice(i - 5, i)) ? i - 5 : i - 4;
      const ok = s >= pend && /^https?$/i.test(src.slice(s, i)) && (s === 0 || URL_BEFORE.test(src[s - 1]));
      const url = ok && bareUrl(src, s, i + 3, false, st.brackets.length > 0);
      if (url) emit(autolink(url.href, url.raw), url.end, s);
      else i++;
    } else if (c === 46 && i >= 3 && i - 3 >= pend && src.startsWith("www", i - 3)) {
      const s = i - 3;
      const url = (s === 0 || URL_BEFORE.test(src[s - 1])) && bareUrl(src, s, i + 1, true, st.brackets.length > 0);
      if (url) emit(autolink(url.href, url.raw), url.end, s);
      else i++;
    } else if (c === 38) {
      ENTITY.lastIndex = i;
      const m = ENTITY.exec(src);
      const decoded = m && decodeEntity(m[1]);
      if (decoded) emit(text(decoded), ENTITY.lastIndex);
      else i++;
    } else i++;
  }
  flush(n);
  processEmphasis(st, null);
  return head.next;
}

function plainText(first) {
  let out = "";
  const stack = [first];
  while (stack.length) {
    const node = stack.pop();
    if (!node) continue;
    stack.push(node.next);
    if (node.k === "text" || node.k === "code") out += node.s;
    else if (node.k === "br") out += " ";
    else stack.push(node.first);
  }
  return out;
}

const WRAPPERS = { em: "em", strong: "strong", del: "del" };

/** Parse `src` as inline Markdown and append the result to `parent`. */
export function renderInline(src, parent) {
  // An explicit stack, not recursion: adversarial nesting cannot overflow the call stack, and past
  // MAX_DEPTH wrappers are dropped (their text still shows).
  const stack = [[parse(src), parent, 0, false]];
  while (stack.length) {
    const [node, into, depth, inLink] = stack.pop();
    if (!node) continue;
    if (node.k === "text") {
      let s = node.s;
      let next = node.next;
      for (; next && next.k === "text"; next = next.next) s += next.s;
      if (s) into.appendChild(document.createTextNode(s));
      stack.push([next, into, depth, inLink]);
      continue;
    }
    stack.push([node.next, into, depth, inLink]);
    if (node.k === "br") into.appendChild(el("br"));
    else if (node.k === "code") {
      const code = el("code");
      code.textContent = node.s;
      into.appendChild(code);
    } else if (node.k === "img") {
      const alt = plainText(node.first);
      if (inLink) into.appendChild(document.createTextNode(alt));
      else {
        const a = anchor(node.href, node.title);
        a.className = "image-link";
        a.textContent = alt || node.href;
        into.appendChild(a);
      }
    } else if (node.k === "link") {
      if (inLink || depth >= MAX_DEPTH) stack.push([node.first, into, depth, inLink]);
      else {
        const a = anchor(node.href, node.title);
        if (!node.first) a.textContent = node.href;
        into.appendChild(a);
        stack.push([node.first, a, depth + 1, true]);
      }
    } else if (depth >= MAX_DEPTH) stack.push([node.first, into, depth, inLink]);
    else {
      const wrapper = el(WRAPPERS[node.k]);
      into.appendChild(wrapper);
      stack.push([node.first, wrapper, depth + 1, inLink]);
    }
  }
}
