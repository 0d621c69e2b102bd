// The only way the Markdown renderer makes elements: createElement from a fixed list of tag names.
// Untrusted text never becomes markup; it is added as text nodes by the callers.

const TAGS = new Set([
  "p", "br", "h1", "h2", "h3", "h4", "h5", "h6", "em", "strong", "del", "code", "pre", "a", "ul", "ol", "li",
  "blockquote", "hr", "table", "thead", "tbody", "tr", "th", "td", "div", "span", "button", "input",
]);

/** A new element from the allow-list, optionally with a class. */
export function el(tag, cls) {
  if (!TAGS.has(tag)) throw new Error(`markdown: tag not allowed: ${tag}`);
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return node;
}
