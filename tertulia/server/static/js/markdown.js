// Markdown for model replies (a CommonMark/GFM subset, rendered the way chat apps do: a single newline
// is a line break). Input is untrusted, so this is safe by construction: elements come from a fixed
// list of tags (markdown-dom.js `el`), text only ever enters the page through text nodes, the only
// attributes set are class, href (http, https, mailto), target, rel, title, type, start, checked,
// disabled, data-lang and a cell's text-align. Raw HTML in the input shows as the characters it is.
// Images are not loaded (the app is offline and must not beacon): they become links. Containers nest
// at most MAX_DEPTH deep and every scan is linear, so hostile text cannot stall the page.

import { highlight } from "./highlight.js";
import { el } from "./markdown-dom.js";
import { renderInline } from "./markdown-inline.js";

const MAX_DEPTH = 20;
const HEADING = /^ {0,3}(#{1,6})(?=[ \t]|$)/;
const QUOTE = /^ {0,3}>/;
const FENCE = /^([ \t]*)(`{3,}|~{3,})([\s\S]*)$/;
const LIST_ITEM = /^([ \t]*)([-*+]|(\d{1,9})[.)])(?=[ \t]|$)/;
const TASK = /^\[([ xX])\](?=[ \t]|$)[ \t]*/;
const DELIMITER_CELL = /^:?-+:?$/;

const isBlank = (line) => !/\S/.test(line);

function indentWidth(line) {
  let col = 0;
  for (let i = 0; i < line.length; i++) {
    if (line[i] === " ") col++;
    else if (line[i] === "\t") col += 4 - (col % 4);
    else break;
  }
  return col;
}

function stripIndent(line, width) {
  let i = 0;
  for (let col = 0; i < line.length && col < width; i++) {
    if (line[i] === " ") col++;
    else if (line[i] === "\t") col += 4 - (col % 4);
    else break;
  }
  return line.slice(i);
}

function fenceOpen(line) {
  const m = FENCE.exec(line);
  if (!m || (m[2][0] === "`" && m[3].includes("`"))) return null;
  const lang = (m[3].trim().split(/\s/, 1)[0] || "").replace(/[^A-Za-z0-9_+#.-]/g, "").slice(0, 20);
  return { indent: indentWidth(m[1]), ch: m[2][0], len: m[2].length, lang };
}

function fenceCloses(line, fence) {
  let i = 0;
  while (line[i] === " " || line[i] === "\t") i++;
  let run = 0;
  while (line[i + run] === fence.ch) run++;
  return run >= fence.len && isBlank(line.slice(i + run));
}

// Where a container (list item, quote) is inside a fenced block, so its blank and unindented lines stay code.
function trackFence(fence, line) {
  if (fence) return fenceCloses(line, fence) ? null : fence;
  return fenceOpen(line);
}

function isHr(line) {
  const t = line.trim();
  const ch = t[0];
  if ((ch !== "-" && ch !== "*" && ch !== "_") || indentWidth(line) > 3) return false;
  let count = 0;
  for (const c of t) {
    if (c === ch) count++;
    else if (c !== " " && c !== "\t") return false;
  }
  return count >= 3;
}

function listItem(line) {
  const m = LIST_ITEM.exec(line);
  if (!m) return null;
  const indent = indentWidth(m[1]);
  const after = line.slice(m[0].length);
  const spaces = indentWidth(after);
  const content = stripIndent(after, spaces);
  return {
    indent,
    ordered: m[3] !== undefined,
    start: m[3] === undefined ? 1 : parseInt(m[3], 10),
    delim: m[2][m[2].length - 1],
    content,
    empty: isBlank(content),
    contentIndent: indent + m[2].length + (spaces === 0 || spaces > 4 ? 1 : spaces),
  };
}

// GFM: an escaped pipe is part of the cell, even inside a code span.
const cellText = (raw) => raw.trim().replace(/\\\|/g, "|");

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const cells = [];
  let from = 0;
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "\\") i++;
    else if (s[i] === "|") {
      cells.push(cellText(s.slice(from, i)));
      from = i + 1;
    }
  }
  cells.push(cellText(s.slice(from)));
  return cells;
}

function tableAlignments(lines, i) {
  const head = lines[i];
  const delim = lines[i + 1];
  if (delim === undefined || !head.includes("|") || !delim.includes("|") || !delim.includes("-")) return null;
  if (!/^[\s|:-]+$/.test(delim)) return null;
  const cells = splitRow(delim);
  if (!cells.every((c) => DELIMITER_CELL.test(c)) || cells.length !== splitRow(head).length) return null;
  return cells.map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : c.startsWith(":") ? "left" : ""));
}

// A line that ends a paragraph (or a lazy continuation) because it starts a block of its own.
function interrupts(lines, i, depth) {
  const line = lines[i];
  if (fenceOpen(line) || HEADING.test(line) || isHr(line)) return true;
  if (depth < MAX_DEPTH) {
    if (QUOTE.test(line)) return true;
    const item = listItem(line);
    if (item && !item.empty && (!item.ordered || item.start === 1)) return true;
  }
  return tableAlignments(lines, i) !== null;
}

function codeBlock(lines, i, fence, parent, opts) {
  const body = [];
  let j = i + 1;
  for (; j < lines.length && !fenceCloses(lines[j], fence); j++) body.push(stripIndent(lines[j], fence.indent));
  const lang = fence.lang || "text";
  const label = opts.copyLabel || "Copy code";
  const block = el("div", "code-block");
  block.setAttribute("data-lang", lang);
  const head = el("div", "code-head");
  const name = el("span", "code-lang");
  name.textContent = lang;
  const copy = el("button", "copy-code");
  copy.type = "button";
  copy.title = label;
  copy.textContent = label;
  head.append(name, copy);
  const pre = el("pre");
  const code = el("code", `language-${lang}`);
  code.appendChild(highlight(body.join("\n"), fence.lang));
  pre.appendChild(code);
  block.append(head, pre);
  parent.appendChild(block);
  // An unclosed fence (a reply still streaming) runs to the end of its container.
  return j < lines.length ? j + 1 : j;
}

function heading(line, level, parent) {
  let content = line.replace(/^[ \t]*#+/, "").trim();
  let end = content.length;
  while (end > 0 && content[end - 1] === "#") end--;
  // A closing run of #s goes only when a space separates it ("# C#" keeps its #).
  if (end === 0) content = "";
  else if (end < content.length && /[ \t]/.test(content[end - 1])) content = content.slice(0, end).trimEnd();
  const h = el(`h${level}`);
  renderInline(content, h);
  parent.appendChild(h);
}

function table(lines, i, aligns, parent) {
  const wrapper = el("div", "table-wrap");
  const tableEl = el("table");
  const row = (line, tag) => {
    const tr = el("tr");
    const cells = splitRow(line);
    aligns.forEach((align, c) => {
      const cell = el(tag);
      if (align) cell.style.textAlign = align;
      renderInline(cells[c] ?? "", cell);
      tr.appendChild(cell);
    });
    return tr;
  };
  const thead = el("thead");
  thead.appendChild(row(lines[i], "th"));
  tableEl.appendChild(thead);
  let j = i + 2;
  const tbody = el("tbody");
  for (; j < lines.length; j++) {
    const line = lines[j];
    if (isBlank(line) || !line.includes("|") || fenceOpen(line) || HEADING.test(line) || QUOTE.test(line)) break;
    tbody.appendChild(row(line, "td"));
  }
  if (tbody.firstChild) tableEl.appendChild(tbody);
  wrapper.appendChild(tableEl);
  parent.appendChild(wrapper);
  return j;
}

function blockquote(lines, i, parent, depth, opts) {
  const inner = [];
  let fence = null;
  let j = i;
  for (; j < lines.length; j++) {
    const line = lines[j];
    const m = QUOTE.exec(line);
    if (m) {
      let rest = line.slice(m[0].length);
      if (rest[0] === " " || rest[0] === "\t") rest = rest.slice(1);
      inner.push(rest);
      fence = trackFence(fence, rest);
      continue;
    }
    // Lazy continuation: an unmarked line still belongs to a paragraph the quote left open.
    const last = inner[inner.length - 1];
    if (fence || isBlank(line) || isBlank(last) || interrupts(lines, j, depth)) break;
    inner.push(line);
  }
  const quote = el("blockquote");
  blocks(inner, quote, depth + 1, opts, false);
  parent.appendChild(quote);
  return j;
}

// One item's lines: anything indented past its marker (lenient: models nest with 2, 3 or 4 spaces),
// lines inside a fence it opened, blank lines followed by more of it, and lazy paragraph continuations.
function listItemLines(lines, j, item, depth) {
  const body = [item.content];
  let fence = trackFence(null, item.content);
  let lastBlank = false;
  let loose = false;
  let k = j + 1;
  for (; k < lines.length; k++) {
    const line = lines[k];
    if (isBlank(line)) {
      body.push(fence ? stripIndent(line, item.contentIndent) : "");
      lastBlank = !fence;
      continue;
    }
    const indent = indentWidth(line);
    if (fence || indent > item.indent) {
      const inner = stripIndent(line, Math.min(indent, item.contentIndent));
      if (lastBlank && indentWidth(inner) === 0 && !listItem(inner)) loose = true;
      body.push(inner);
      fence = trackFence(fence, inner);
    } else if (!lastBlank && !listItem(line) && !interrupts(lines, k, depth)) body.push(line.trimStart());
    else break;
    lastBlank = false;
  }
  let end = body.length;
  while (end > 1 && body[end - 1] === "") end--;
  const trailingBlank = end < body.length;
  body.length = end;
  return { body, next: k, loose, trailingBlank };
}

function list(lines, i, parent, depth, opts) {
  const first = listItem(lines[i]);
  const listEl = el(first.ordered ? "ol" : "ul");
  if (first.ordered && first.start !== 1) listEl.setAttribute("start", String(first.start));
  const items = [];
  let loose = false;
  let gap = false;
  let j = i;
  while (j < lines.length) {
    const item = listItem(lines[j]);
    if (!item || item.ordered !== first.ordered || item.delim !== first.delim || isHr(lines[j])) break;
    if (gap) loose = true;
    const found = listItemLines(lines, j, item, depth);
    items.push(found.body);
    loose ||= found.loose;
    gap = found.trailingBlank;
    j = found.next;
  }
  let tasks = false;
  for (const body of items) {
    const li = el("li");
    const task = TASK.exec(body[0]);
    let box = null;
    if (task) {
      body[0] = body[0].slice(task[0].length);
      box = el("input");
      box.type = "checkbox";
      box.disabled = true;
      if (task[1] !== " ") box.setAttribute("checked", "");
      li.className = "task-list-item";
      tasks = true;
    }
    blocks(body, li, depth + 1, opts, !loose);
    if (box) {
      const host = li.firstChild && li.firstChild.nodeName === "P" ? li.firstChild : li;
      host.insertBefore(document.createTextNode(" "), host.firstChild);
      host.insertBefore(box, host.firstChild);
    }
    listEl.appendChild(li);
  }
  if (tasks) listEl.className = "contains-task-list";
  parent.appendChild(listEl);
  return j;
}

function paragraph(lines, i, parent, depth, tight) {
  const parts = [lines[i].trim()];
  let j = i + 1;
  for (; j < lines.length && !isBlank(lines[j]) && !interrupts(lines, j, depth); j++) parts.push(lines[j].trim());
  if (tight) renderInline(parts.join("\n"), parent);
  else {
    const p = el("p");
    renderInline(parts.join("\n"), p);
    parent.appendChild(p);
  }
  return j;
}

// Block structure of `lines` into `parent`. `tight`: paragraphs of a tight list item are not wrapped in <p>.
function blocks(lines, parent, depth, opts, tight) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (isBlank(line)) i++;
    else if ((m = fenceOpen(line))) i = codeBlock(lines, i, m, parent, opts);
    else if ((m = HEADING.exec(line))) {
      heading(line, m[1].length, parent);
      i++;
    } else if (isHr(line)) {
      parent.appendChild(el("hr"));
      i++;
    } else if (depth < MAX_DEPTH && QUOTE.test(line)) i = blockquote(lines, i, parent, depth, opts);
    else if (depth < MAX_DEPTH && listItem(line)) i = list(lines, i, parent, depth, opts);
    else if ((m = tableAlignments(lines, i))) i = table(lines, i, m, parent);
    else i = paragraph(lines, i, parent, depth, tight);
  }
}

/**
 * Render untrusted Markdown `text` to a DocumentFragment.
 * options.copyLabel: the text and title of each code block's copy button (default "Copy code").
 */
export function renderMarkdown(text, options = {}) {
  const fragment = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").replace(/\0/g, "\ufffd").split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  blocks(lines, fragment, 0, options || {}, false);
  return fragment;
}
