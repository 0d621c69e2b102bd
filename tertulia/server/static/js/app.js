// The page's entry point: who is asking, what can be served, then the route (/ or /c/{id}), the top
// bar's pickers, the composer and the keyboard shortcuts.

import { api, download, setApiKey, setCsrfToken } from "./api.js";
import { applyText, currentLanguage, LANGUAGES, setLanguage, t } from "./i18n.js";
import { state, on, current, modelFor } from "./state.js";
import { applyIcons } from "./icons.js";
import { el, $, showError } from "./ui.js";
import { installSidebar, loadList, renderList } from "./sidebar.js";
import { askKey, fillSettings, flushSettings, installPanels, loadPersonas, login } from "./panels.js";
import {
  installCodeCopy,
  newChat,
  openConversation,
  patchConversation,
  refreshMeter,
  renderConversation,
  send,
  stats,
  stop,
} from "./chat.js";

// --- theme ---------------------------------------------------------------------------------------

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
}

function installTheme() {
  const saved = localStorage.getItem("tertulia.theme");
  const dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  applyTheme(saved || (dark ? "dark" : "light"));
  $("#toggle-theme").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("tertulia.theme", next);
    applyTheme(next);
  });
}

function installLanguage() {
  const select = $("#language");
  select.replaceChildren(...Object.entries(LANGUAGES).map(([code, name]) => el("option", { value: code }, name)));
  select.value = currentLanguage();
  select.addEventListener("change", () => {
    setLanguage(select.value);
    renderPickers();
    renderList();
    renderConversation();
    refreshMeter();
  });
}

// --- routing -------------------------------------------------------------------------------------

function routeId() {
  const match = location.pathname.match(/^\/c\/([^/]+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

async function navigate(id, { push = true } = {}) {
  if (state.streaming) stop();
  closeSidebar();
  if (push) history.pushState(null, "", id ? `/c/${encodeURIComponent(id)}` : "/");
  try {
    if (id) await openConversation(id);
    else newChat();
  } catch (error) {
    showError(error);
  }
  $("#input").focus();
}

function startChatWith(persona) {
  $("#personas-dialog").close();
  if (state.streaming) stop();
  history.pushState(null, "", "/");
  newChat({ persona_id: persona.id });
  $("#input").focus();
}

// --- top bar -------------------------------------------------------------------------------------

function renderPickers() {
  const fields = current();
  const models = $("#model-picker");
  models.replaceChildren(...state.models.map((m) => el("option", { value: m.id }, m.local ? m.id : `${m.id} ↗`)));
  const model = modelFor(fields);
  if (fields.model && (!model || model.id !== fields.model)) {
    // A conversation kept with a model this server no longer serves: say so, and let another be picked.
    models.prepend(el("option", { value: fields.model, disabled: true }, `${fields.model} (${t("unavailable")})`));
    models.value = fields.model;
  } else if (model) models.value = model.id;
  const personas = $("#persona-picker");
  personas.replaceChildren(
    el("option", { value: "" }, t("noPersona")),
    ...state.personas.map((p) => el("option", { value: p.id }, p.name)),
  );
  personas.value = fields.persona_id || "";
  const conversation = state.conversation;
  $("#export-md").hidden = $("#export-json").hidden = !conversation;
  document.title = conversation ? `${conversation.title} · Tertulia` : "Tertulia";
}

async function changeField(name, value) {
  if (!state.conversation) {
    state.draft[name] = value || null;
    if (name === "persona_id") renderConversation(); // the empty view names the persona
    refreshMeter();
    return;
  }
  try {
    await patchConversation(state.conversation.id, { [name]: value || null });
    renderPickers();
    refreshMeter();
  } catch (error) {
    showError(error);
    renderPickers();
  }
}

function exportAs(format) {
  const conversation = state.conversation;
  if (!conversation) return;
  const path = `/api/conversations/${conversation.id}/export?format=${format}`;
  download(path, `conversation-${conversation.id}.${format === "json" ? "json" : "md"}`).catch(showError);
}

function installTopBar() {
  $("#export-md").addEventListener("click", () => exportAs("markdown"));
  $("#export-json").addEventListener("click", () => exportAs("json"));
  $("#model-picker").addEventListener("change", (event) => changeField("model", event.target.value));
  $("#persona-picker").addEventListener("change", (event) => changeField("persona_id", event.target.value));
  on("conversation", renderPickers);
  on("personas", renderPickers);
  on("settings", () => fillSettings());
}

// --- the composer --------------------------------------------------------------------------------

function fitInput(input) {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

function installComposer() {
  const form = $("#composer");
  const input = $("#input");
  const submit = async () => {
    const text = input.value;
    if (!text.trim() || state.streaming) return;
    input.value = "";
    fitInput(input);
    await flushSettings();
    if (!(await send(text)) && !input.value) {
      input.value = text; // refused (too long, offline…): the message is not lost
      fitInput(input);
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  input.addEventListener("input", () => fitInput(input));
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  $("#stop").addEventListener("click", stop);
  on("streaming", (active) => {
    $("#send").hidden = active;
    $("#stop").hidden = !active;
    document.body.dataset.streaming = String(active);
  });
  // How many replies this page has finished and read back (the browser tests wait on it).
  on("saved", () => (document.body.dataset.replies = String(Number(document.body.dataset.replies || 0) + 1)));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.streaming) {
      event.preventDefault();
      stop();
    } else if ((event.ctrlKey || event.metaKey) && event.shiftKey && event.key.toLowerCase() === "o") {
      event.preventDefault();
      navigate(null);
    } else if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "k") {
      event.preventDefault();
      openSidebar();
      $("#search").focus();
    }
  });
}

// --- the sidebar on narrow screens ---------------------------------------------------------------

function openSidebar() {
  document.body.classList.add("sidebar-open");
  $("#scrim").hidden = false;
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  $("#scrim").hidden = true;
}

// --- start ---------------------------------------------------------------------------------------

async function who() {
  let me;
  for (;;) {
    try {
      me = await api("GET", "/api/auth/me");
      break;
    } catch (error) {
      if (error.code !== "invalid_api_key") throw error;
      setApiKey(await askKey(error.message));
    }
  }
  state.auth = me.auth;
  if (me.auth && !me.user) {
    const session = await login(me.first_account);
    state.user = session.user;
    setCsrfToken(session.csrf_token);
  } else {
    state.user = me.user;
    setCsrfToken(me.csrf_token);
  }
  const account = $("#open-account");
  account.hidden = !state.auth;
  account.textContent = state.user ? state.user.name : "";
}

async function start() {
  installTheme();
  applyIcons();
  applyText();
  installLanguage();
  $("#open-sidebar").addEventListener("click", openSidebar);
  $("#close-sidebar").addEventListener("click", closeSidebar);
  $("#scrim").addEventListener("click", closeSidebar);
  installSidebar((id) => navigate(id));
  installPanels(startChatWith);
  installTopBar();
  installComposer();
  installCodeCopy();
  window.addEventListener("popstate", () => navigate(routeId(), { push: false }));
  window.tertulia = { stats }; // read by the browser tests (render time of a conversation)
  try {
    await who();
    const [models] = await Promise.all([api("GET", "/api/models"), loadPersonas(), loadList()]);
    state.models = models;
    await navigate(routeId(), { push: false });
  } catch (error) {
    showError(error);
  }
  document.body.dataset.ready = "true";
}

start();
