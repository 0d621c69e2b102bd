// The open conversation: its messages, replies streaming in, and what can be done to a message
// (copy, edit and resend, regenerate, switch between branches, rate). Everything shown is re-read
// from the server after a reply, so the page never drifts from what is stored.

import { api, streamReply } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { t } from "./i18n.js";
import { state, emit, current, personaById, modelFor } from "./state.js";
import { icon } from "./icons.js";
import { el, $, showError, copyText, flash } from "./ui.js";

const messagesBox = () => $("#messages");

export const stats = { renderMs: null }; // read by the browser tests

// --- rendering -----------------------------------------------------------------------------------

function body(role, content) {
  if (role === "assistant") return el("div", { class: "content markdown" }, renderMarkdown(content, { copyLabel: t("copyCode") }));
  return el("div", { class: "content plain" }, content);
}

function statsLine(message) {
  if (!message.completion_tokens) return null;
  const text = message.tokens_per_second
    ? t("tokensSpeed", { tokens: message.completion_tokens, speed: message.tokens_per_second.toFixed(1) })
    : t("tokensOnly", { tokens: message.completion_tokens });
  return el("span", { class: "stats" }, text);
}

function branchNav(turn) {
  const { index, count, ids } = turn.branch;
  if (count < 2) return null;
  const go = (to) => () => switchBranch(ids[to]);
  return el(
    "span",
    { class: "branch", title: t("branch", { index: index + 1, count }) },
    el("button", { type: "button", class: "icon small branch-prev", disabled: index === 0, onclick: go(index - 1) }, icon("prev")),
    el("span", { class: "branch-label" }, `${index + 1}/${count}`),
    el("button", { type: "button", class: "icon small branch-next", disabled: index === count - 1, onclick: go(index + 1) }, icon("next")),
  );
}

function action(label, className, handler, name) {
  return el("button", { type: "button", class: `icon small ${className}`, title: label, "aria-label": label, onclick: handler }, icon(name));
}

function actions(turn) {
  const message = turn;
  const copy = action(t("copy"), "copy-message", async (event) => {
    if (await copyText(message.content)) flash(event.currentTarget);
  }, "copy");
  const row = el("div", { class: "actions" }, branchNav(turn), copy);
  if (message.role === "user") {
    row.append(action(t("edit"), "edit-message", () => startEdit(turn), "edit"));
  } else {
    const rating = (state.conversation && state.conversation.ratings[message.id]) || 0;
    const rate = (value) => () => setRating(message.id, rating === value ? 0 : value);
    row.append(
      action(t("good"), `rate-up${rating === 1 ? " active" : ""}`, rate(1), "up"),
      action(t("bad"), `rate-down${rating === -1 ? " active" : ""}`, rate(-1), "down"),
      action(t("regenerate"), "regenerate", () => regenerate(turn), "regenerate"),
    );
    const line = statsLine(message);
    if (line) row.append(line);
  }
  return row;
}

function messageView(turn) {
  const view = el(
    "article",
    { class: `message ${turn.role}`, dataset: { id: turn.id || "", status: turn.status || "complete" } },
    el("div", { class: "bubble" }, body(turn.role, turn.content)),
  );
  if (turn.status === "incomplete") view.append(el("div", { class: "badge incomplete" }, t("incomplete")));
  if (turn.status === "streaming") view.append(el("div", { class: "badge streaming" }, t("streamingElsewhere")));
  if (turn.id && turn.branch) view.append(actions(turn));
  return view;
}

function emptyView() {
  const persona = personaById(current().persona_id);
  return el(
    "div",
    { class: "empty" },
    el("img", { src: "/static/favicon.svg", alt: "", width: 48, height: 48 }),
    el("h1", {}, persona ? t("emptyPersona", { name: persona.name }) : t("empty")),
  );
}

export function renderConversation() {
  const started = performance.now();
  const box = messagesBox();
  const turns = state.conversation ? state.conversation.messages : [];
  const fragment = document.createDocumentFragment();
  if (!turns.length) fragment.append(emptyView());
  for (const turn of turns) fragment.append(messageView(turn));
  box.replaceChildren(fragment);
  box.scrollTop = box.scrollHeight;
  stats.renderMs = performance.now() - started;
  document.body.dataset.rendered = String(turns.length);
}

// --- the context meter ---------------------------------------------------------------------------

export function showMeter(used, context, dropped) {
  const meter = $("#context-meter");
  if (!context) {
    meter.hidden = true;
    return;
  }
  meter.hidden = false;
  const share = Math.min(1, used / context);
  meter.querySelector(".meter-fill").style.width = `${(share * 100).toFixed(1)}%`;
  meter.dataset.level = share > 0.9 ? "high" : share > 0.7 ? "mid" : "low";
  meter.querySelector(".meter-label").textContent = t("contextMeter", { used, context });
  const notice = $("#notice");
  notice.hidden = !dropped;
  notice.textContent = dropped ? t("dropped", { count: dropped }) : "";
}

export async function refreshMeter() {
  const conversation = state.conversation;
  const model = modelFor(current());
  if (!conversation || !conversation.messages.length) {
    showMeter(0, model && model.context_length, 0);
    return;
  }
  try {
    const fit = await api("GET", `/api/conversations/${conversation.id}/context`);
    if (state.conversation === conversation) showMeter(fit.prompt_tokens, fit.context, fit.dropped);
  } catch {
    // An unserved model or a full queue: the meter waits; sending a message says what is wrong.
    if (state.conversation === conversation) $("#context-meter").hidden = true;
  }
}

// --- loading -------------------------------------------------------------------------------------

// Bumped by every navigation: a response that arrives for a view the user has left is dropped.
let navigation = 0;
let pollTimer = null;
const FOLLOW_MS = 500;

const isStreaming = (conversation) => conversation.messages.some((m) => m.status === "streaming");

export async function openConversation(id, { quiet = false, follow = false } = {}) {
  clearTimeout(pollTimer);
  const mine = follow ? navigation : ++navigation;
  let conversation;
  try {
    conversation = await api("GET", `/api/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    if (mine !== navigation) return;
    if (error.status === 404) {
      state.conversation = null;
      emit("conversation", null);
      renderConversation();
      showError(new Error(t("notFound")));
      return;
    }
    throw error;
  }
  if (mine !== navigation || state.streaming) return;
  const unchanged = follow && state.conversation && JSON.stringify(state.conversation) === JSON.stringify(conversation);
  state.conversation = conversation;
  if (!unchanged) {
    emit("conversation", conversation);
    renderConversation();
  }
  // A reply still being written (by another tab, or stopped and not yet closed): follow it.
  if (isStreaming(conversation)) {
    pollTimer = setTimeout(() => openConversation(id, { quiet: true, follow: true }), FOLLOW_MS);
  }
  if (!quiet || !isStreaming(conversation)) refreshMeter();
}

export function newChat(fields = {}) {
  clearTimeout(pollTimer);
  navigation++;
  state.conversation = null;
  state.draft = { persona_id: null, model: null, system_prompt: null, settings: {}, ...fields };
  emit("conversation", null);
  renderConversation();
  refreshMeter();
}

/** PATCH the conversation; the answer updates the page only if it still shows that conversation. */
export async function patchConversation(id, fields) {
  const updated = await api("PATCH", `/api/conversations/${id}`, fields);
  if (state.conversation && state.conversation.id === id) {
    for (const key of Object.keys(fields)) state.conversation[key] = updated[key];
  }
  const listed = state.conversations.find((c) => c.id === id);
  if (listed) Object.assign(listed, { title: updated.title, updated_at: updated.updated_at });
  return updated;
}

// --- replies -------------------------------------------------------------------------------------

function nearBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
}

/**
 * Stream a reply: `keep` turns stay shown, then the new user message (if any) and the growing reply.
 * The server stores both as they arrive; when it is done, the conversation is read back.
 * Returns whether the server took the request (false: refused, nothing was stored).
 */
async function runReply(conversationId, request, keep, userText) {
  clearTimeout(pollTimer);
  const mine = navigation;
  const box = messagesBox();
  const shown = state.conversation ? state.conversation.messages.slice(0, keep) : [];
  if (state.conversation) state.conversation.messages = shown;
  const fragment = document.createDocumentFragment();
  for (const turn of shown) fragment.append(messageView(turn));
  if (userText !== null) fragment.append(messageView({ role: "user", content: userText }));
  const reply = messageView({ role: "assistant", content: "", status: "writing" });
  reply.classList.add("writing");
  fragment.append(reply);
  box.replaceChildren(fragment);
  box.scrollTop = box.scrollHeight;

  const controller = new AbortController();
  state.streaming = { controller, conversationId };
  emit("streaming", true);
  const content = reply.querySelector(".content");
  let text = "";
  let frame = null;
  let started = false;
  const paint = () => {
    frame = null;
    const follow = nearBottom(box);
    content.replaceChildren(renderMarkdown(text, { copyLabel: t("copyCode") }));
    if (follow) box.scrollTop = box.scrollHeight;
  };
  try {
    await streamReply(
      conversationId,
      request,
      (event) => {
        if (event.type === "start") {
          started = true;
          reply.dataset.id = event.assistant_message_id;
          showMeter(event.prompt_tokens, event.context, event.dropped);
        } else if (event.type === "delta") {
          text += event.text;
          if (frame === null) frame = requestAnimationFrame(paint);
        } else if (event.type === "done" && event.error) {
          showError(new Error(event.error));
        }
      },
      controller.signal,
    );
  } catch (error) {
    showError(error);
  } finally {
    if (frame !== null) cancelAnimationFrame(frame);
    state.streaming = null;
    emit("streaming", false);
  }
  // Stopped: the request reached the server, which keeps what it has (the reload follows it).
  const taken = started || controller.signal.aborted;
  if (mine === navigation) await openConversation(conversationId, { quiet: true }).catch(showError);
  emit("saved", conversationId);
  return taken;
}

async function ensureConversation() {
  if (state.conversation) return state.conversation.id;
  const draft = state.draft;
  const fields = { settings: draft.settings };
  for (const key of ["persona_id", "model", "system_prompt"]) if (draft[key]) fields[key] = draft[key];
  const created = await api("POST", "/api/conversations", fields);
  state.conversation = { ...created, messages: [], ratings: {} };
  history.pushState(null, "", `/c/${created.id}`);
  emit("created", created);
  return created.id;
}

/** Send a message; false when it was refused (the caller keeps the text for the user). */
export async function send(text) {
  if (state.streaming) return false;
  if (state.conversation && isStreaming(state.conversation)) {
    showError(new Error(t("streamingElsewhere"))); // answer it once it is written, not half-way
    return false;
  }
  const fresh = !state.conversation;
  try {
    const id = await ensureConversation();
    // Answer what this tab shows: another tab's newer messages make a branch here, not a tangle.
    const shown = state.conversation.messages;
    const parent = shown.length ? shown[shown.length - 1].id : null;
    const taken = await runReply(id, { content: text, parent_id: parent }, shown.length, text);
    if (!taken && fresh) await discard(id);
    return taken;
  } catch (error) {
    showError(error);
    return false;
  }
}

export function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

async function regenerate(turn) {
  if (state.streaming) return;
  const index = state.conversation.messages.findIndex((m) => m.id === turn.id);
  await runReply(state.conversation.id, { parent_id: turn.parent_id, regenerate: true }, index, null);
}

/** A new chat whose first message was refused: remove the empty conversation, keep the draft. */
async function discard(id) {
  if (state.conversation && state.conversation.messages.length) return;
  await api("DELETE", `/api/conversations/${id}`).catch(() => {});
  navigation++;
  state.conversation = null;
  history.replaceState(null, "", "/");
  emit("conversation", null);
  emit("deleted", id);
  renderConversation();
}

function startEdit(turn, draft = turn.content) {
  if (state.streaming) return;
  const node = messagesBox().querySelector(`[data-id="${CSS.escape(turn.id)}"]`);
  if (!node) return;
  const area = el("textarea", { class: "edit-box", rows: Math.min(12, draft.split("\n").length + 1) });
  area.value = draft;
  const submit = async () => {
    const text = area.value;
    if (!text.trim()) return;
    const index = state.conversation.messages.findIndex((m) => m.id === turn.id);
    const taken = await runReply(state.conversation.id, { content: text, parent_id: turn.parent_id }, index, text);
    if (!taken) startEdit(turn, text); // refused: the edit is still there to fix
  };
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === "Escape") renderConversation();
  });
  const editor = el(
    "div",
    { class: "editor" },
    area,
    el(
      "div",
      { class: "row end" },
      el("button", { type: "button", onclick: renderConversation }, t("cancel")),
      el("button", { type: "button", class: "primary save-edit", onclick: submit }, t("saveSend")),
    ),
  );
  node.replaceChildren(editor);
  area.focus();
}

async function switchBranch(messageId) {
  if (state.streaming) return;
  try {
    const turns = await api("POST", `/api/conversations/${state.conversation.id}/branch`, { message_id: messageId });
    state.conversation.messages = turns;
    const scroll = messagesBox().scrollTop;
    renderConversation();
    messagesBox().scrollTop = scroll;
    refreshMeter();
  } catch (error) {
    showError(error);
  }
}

async function setRating(messageId, rating) {
  try {
    await api("POST", `/api/messages/${messageId}/rating`, { rating });
    state.conversation.ratings[messageId] = rating;
    const scroll = messagesBox().scrollTop;
    renderConversation();
    messagesBox().scrollTop = scroll;
  } catch (error) {
    showError(error);
  }
}

export function installCodeCopy() {
  messagesBox().addEventListener("click", async (event) => {
    const button = event.target.closest(".copy-code");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("pre code");
    if (await copyText(code.textContent)) flash(button, t("copied"));
  });
}
