// Small DOM helpers shared by the page's parts. Text always goes in as text nodes, never as HTML.

import { t } from "./i18n.js";

/** el("button", {class: "x", onclick: f}, "text", child) — attributes, properties and children. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

let toastTimer = null;

export function toast(message, kind = "error") {
  const box = $("#toast");
  box.textContent = message;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), 6000);
}

/** Report an error the user should see: the API's own message when there is one. */
export function showError(error) {
  if (error && error.name === "AbortError") return;
  if (error && error.code === "offline") toast(t("offline"));
  else toast((error && error.message) || String(error));
  console.warn(error);
}

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

/** Copy text; falls back to a hidden textarea where the Clipboard API is unavailable (plain http). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // permission refused: try the fallback
    }
  }
  const area = el("textarea", { class: "offscreen", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  const done = document.execCommand("copy");
  area.remove();
  return done;
}

/** Briefly mark a button as done (and relabel it, when given a label). */
export function flash(button, label) {
  const before = label ? button.textContent : null;
  if (label) button.textContent = label;
  button.classList.add("flashed");
  setTimeout(() => {
    if (before !== null) button.textContent = before;
    button.classList.remove("flashed");
  }, 1200);
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
