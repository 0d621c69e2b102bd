// The conversation list: newest first, grouped by day, searchable by content; rename and delete in
// place; import of a JSON export.

import { api, MAX_UPLOAD_BYTES } from "./api.js";
import { t } from "./i18n.js";
import { state, on } from "./state.js";
import { patchConversation } from "./chat.js";
import { icon } from "./icons.js";
import { el, $, showError, formatBytes, debounce, toast } from "./ui.js";

let navigate = () => {};

function groupOf(date, now) {
  const day = 86400000;
  const startOfToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  const time = date.getTime();
  if (time >= startOfToday) return "today";
  if (time >= startOfToday - day) return "yesterday";
  if (time >= startOfToday - 7 * day) return "week";
  return "older";
}

function item(conversation) {
  const active = state.conversation && state.conversation.id === conversation.id;
  const link = el(
    "a",
    {
      class: `conversation${active ? " active" : ""}`,
      href: `/c/${conversation.id}`,
      dataset: { id: conversation.id },
      onclick: (event) => {
        if (event.metaKey || event.ctrlKey || event.button !== 0) return;
        event.preventDefault();
        navigate(conversation.id);
      },
    },
    el("span", { class: "title" }, conversation.title),
  );
  const rename = el("button", { type: "button", class: "icon small rename", title: t("rename"), "aria-label": t("rename"), onclick: () => startRename(row, conversation) }, icon("edit"));
  const remove = el("button", { type: "button", class: "icon small delete", title: t("delete"), "aria-label": t("delete"), onclick: () => removeConversation(conversation) }, icon("trash"));
  const row = el("div", { class: "conversation-row" }, link, el("span", { class: "row-actions" }, rename, remove));
  return row;
}

export function renderList() {
  const list = $("#conversation-list");
  const now = new Date();
  const fragment = document.createDocumentFragment();
  let group = null;
  for (const conversation of state.conversations) {
    const next = groupOf(new Date(conversation.updated_at), now);
    if (next !== group) {
      group = next;
      fragment.append(el("h3", { class: "group" }, t(group)));
    }
    fragment.append(item(conversation));
  }
  list.replaceChildren(fragment);
}

export async function loadList() {
  const query = state.search ? `?search=${encodeURIComponent(state.search)}` : "";
  try {
    state.conversations = await api("GET", `/api/conversations${query}`);
    renderList();
  } catch (error) {
    showError(error);
  }
}

function startRename(row, conversation) {
  const input = el("input", { class: "rename-box", maxlength: 300 });
  input.value = conversation.title;
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        await patchConversation(conversation.id, { title });
      } catch (error) {
        showError(error);
      }
    }
    renderList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    else if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  row.replaceChildren(input);
  input.focus();
  input.select();
}

async function removeConversation(conversation) {
  if (!confirm(t("confirmDelete", { title: conversation.title }))) return;
  try {
    await api("DELETE", `/api/conversations/${conversation.id}`);
  } catch (error) {
    if (error.status !== 404) return showError(error);
  }
  state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
  renderList();
  if (state.conversation && state.conversation.id === conversation.id) navigate(null);
}

async function importFile(file) {
  if (file.size > MAX_UPLOAD_BYTES) {
    toast(t("tooLarge", { size: formatBytes(file.size), limit: formatBytes(MAX_UPLOAD_BYTES) }));
    return;
  }
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch {
    toast(t("badImport"));
    return;
  }
  try {
    const conversation = await api("POST", "/api/conversations/import", data);
    await loadList();
    navigate(conversation.id);
  } catch (error) {
    showError(error);
  }
}

export function installSidebar(navigateTo) {
  navigate = navigateTo;
  const search = $("#search");
  const runSearch = debounce(() => {
    state.search = search.value.trim();
    loadList();
  }, 250);
  search.addEventListener("input", runSearch);
  $("#import-json").addEventListener("click", () => $("#import-file").click());
  $("#import-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    event.target.value = "";
    if (file) importFile(file);
  });
  on("conversation", renderList);
  on("created", loadList);
  on("saved", loadList);
  on("deleted", loadList);
}
