// The settings panel (a Playground-style set of sampling controls and the system prompt), the
// assistants ("personas": a name, instructions, a default model and temperature), and the account.

import { api } from "./api.js";
import { t } from "./i18n.js";
import { patchConversation } from "./chat.js";
import { state, emit, current, on, modelFor, personaById } from "./state.js";
import { el, $, showError, copyText, flash } from "./ui.js";

const NUMBERS = ["temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "repetition_penalty", "seed"];

// --- settings ------------------------------------------------------------------------------------

/** What a reply will use: the model's defaults (from the server), then the persona's, then these. */
function effective(fields) {
  const persona = personaById(fields.persona_id);
  const model = modelFor(fields);
  const defaults = (model && model.default_settings) || {};
  return { ...defaults, ...(persona ? persona.settings : {}), ...(fields.settings || {}) };
}

export function fillSettings() {
  const form = $("#settings-form");
  const fields = current();
  const values = effective(fields);
  form.elements.system_prompt.value = fields.system_prompt || "";
  for (const name of NUMBERS) {
    const input = form.elements[name];
    input.value = values[name] ?? "";
    input.placeholder = t("defaultValue");
    const output = input.parentElement.querySelector("output");
    if (output) output.textContent = values[name] ?? "";
  }
  form.elements.stop.value = (values.stop || []).join("\n");
}

/** The conversation's own settings: what the form shows, less what the defaults and persona give. */
function readSettings() {
  const form = $("#settings-form");
  const base = effective({ ...current(), settings: {} });
  const settings = {};
  for (const name of NUMBERS) {
    const raw = form.elements[name].value;
    if (raw === "") continue;
    const value = name === "max_tokens" || name === "seed" ? parseInt(raw, 10) : parseFloat(raw);
    if (!Number.isNaN(value) && value !== base[name]) settings[name] = value;
  }
  const stop = form.elements.stop.value.split("\n").filter((s) => s.length).slice(0, 4);
  if (stop.length) settings.stop = stop;
  return settings;
}

// A change is applied to the page at once and sent to the server shortly after (one PATCH for a
// burst of slider moves), to the conversation it was made in even if the user has moved on.
let pending = null;
let pendingTimer = null;
const SAVE_DELAY_MS = 400;

function markSaved() {
  document.body.dataset.settingsSaved = String(Number(document.body.dataset.settingsSaved || 0) + 1);
}

/** Send a change still waiting (before a message goes out, so the reply uses it). */
export async function flushSettings() {
  clearTimeout(pendingTimer);
  const change = pending;
  pending = null;
  if (!change) return;
  try {
    const updated = await patchConversation(change.id, change.fields);
    if (state.conversation && state.conversation.id === change.id) emit("settings", updated);
    markSaved();
  } catch (error) {
    showError(error);
  }
}

function settingsChanged() {
  const form = $("#settings-form");
  const fields = { settings: readSettings(), system_prompt: form.elements.system_prompt.value || null };
  Object.assign(current(), fields); // a draft takes them now; it is saved with its first message
  if (!state.conversation) {
    markSaved();
    return;
  }
  if (pending && pending.id !== state.conversation.id) flushSettings();
  pending = { id: state.conversation.id, fields };
  clearTimeout(pendingTimer);
  pendingTimer = setTimeout(flushSettings, SAVE_DELAY_MS);
}

function installSettings() {
  const panel = $("#settings-panel");
  const form = $("#settings-form");
  form.addEventListener("input", (event) => {
    const output = event.target.parentElement.querySelector("output");
    if (output) output.textContent = event.target.value;
    settingsChanged();
  });
  form.addEventListener("submit", (event) => event.preventDefault());
  $("#reset-settings").addEventListener("click", () => {
    current().settings = {};
    fillSettings();
    settingsChanged();
  });
  $("#open-settings").addEventListener("click", () => {
    fillSettings();
    panel.hidden = !panel.hidden;
  });
  $("#close-settings").addEventListener("click", () => (panel.hidden = true));
  on("conversation", () => !panel.hidden && fillSettings());
}

// --- personas ------------------------------------------------------------------------------------

export async function loadPersonas() {
  state.personas = await api("GET", "/api/personas");
  emit("personas", state.personas);
}

function editPersona(persona) {
  const form = $("#persona-form");
  form.elements.id.value = persona ? persona.id : "";
  form.elements.name.value = persona ? persona.name : "";
  form.elements.instructions.value = persona ? persona.instructions : "";
  form.elements.model.value = (persona && persona.model) || "";
  form.elements.temperature.value = persona && persona.settings.temperature !== undefined ? persona.settings.temperature : "";
  $("#persona-delete").hidden = !persona;
  form.elements.name.focus();
}

function renderPersonas(startChat) {
  const list = $("#persona-list");
  if (!state.personas.length) {
    list.replaceChildren(el("li", { class: "muted" }, t("noPersonas")));
    return;
  }
  list.replaceChildren(
    ...state.personas.map((persona) =>
      el(
        "li",
        { class: "persona", dataset: { id: persona.id } },
        el("button", { type: "button", class: "link persona-edit", onclick: () => editPersona(persona) }, persona.name),
        el("button", { type: "button", class: "small primary persona-chat", onclick: () => startChat(persona) }, t("startChat")),
      ),
    ),
  );
}

function installPersonas(startChat) {
  const dialog = $("#personas-dialog");
  const form = $("#persona-form");
  const modelSelect = form.elements.model;
  const fillModels = () =>
    modelSelect.replaceChildren(el("option", { value: "" }, t("defaultValue")), ...state.models.map((m) => el("option", { value: m.id }, m.id)));
  $("#open-personas").addEventListener("click", () => {
    fillModels();
    renderPersonas(startChat);
    editPersona(null);
    dialog.showModal();
  });
  $("#persona-new").addEventListener("click", () => editPersona(null));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = form.elements.id.value;
    const temperature = form.elements.temperature.value;
    const body = {
      name: form.elements.name.value.trim(),
      instructions: form.elements.instructions.value,
      model: modelSelect.value || null,
      settings: temperature === "" ? {} : { temperature: parseFloat(temperature) },
    };
    try {
      const saved = id ? await api("PATCH", `/api/personas/${id}`, body) : await api("POST", "/api/personas", body);
      await loadPersonas();
      renderPersonas(startChat);
      editPersona(state.personas.find((p) => p.id === saved.id));
    } catch (error) {
      showError(error);
    }
  });
  $("#persona-delete").addEventListener("click", async () => {
    const id = form.elements.id.value;
    if (!id || !confirm(t("confirmDelete", { title: form.elements.name.value }))) return;
    try {
      await api("DELETE", `/api/personas/${id}`);
      await loadPersonas();
      renderPersonas(startChat);
      editPersona(null);
    } catch (error) {
      showError(error);
    }
  });
}

// --- account -------------------------------------------------------------------------------------

async function renderKeys() {
  const keys = await api("GET", "/api/keys");
  $("#key-list").replaceChildren(
    ...keys.map((key) =>
      el(
        "li",
        {},
        el("code", {}, `${key.prefix}…`),
        ` ${key.name} `,
        el("button", { type: "button", class: "small danger", onclick: async () => {
          await api("DELETE", `/api/keys/${key.id}`).catch(showError);
          renderKeys();
        } }, t("revoke")),
      ),
    ),
  );
}

/** The admin's list of accounts, each with a button to disable it (or enable it again). */
async function renderUsers() {
  const users = await api("GET", "/api/users");
  $("#user-list").replaceChildren(
    ...users.map((user) => {
      const toggle = el("button", { type: "button", class: user.disabled ? "small" : "small danger" },
        t(user.disabled ? "enable" : "disable"));
      toggle.addEventListener("click", async () => {
        await api("POST", `/api/users/${user.id}/${user.disabled ? "enable" : "disable"}`).catch(showError);
        renderUsers().catch(showError);
      });
      const self = state.user && state.user.id === user.id;
      return el("li", { "data-user": user.name, class: user.disabled ? "disabled" : "" },
        `${user.name}${user.is_admin ? " (admin)" : ""} `, self ? "" : toggle);
    }),
  );
}

function installAccount() {
  const dialog = $("#account-dialog");
  $("#open-account").addEventListener("click", async () => {
    $("#account-name").textContent = state.user ? state.user.name : "";
    const admin = Boolean(state.user && state.user.is_admin);
    $("#user-admin").hidden = !admin;
    $("#new-key-secret").hidden = true;
    dialog.showModal();
    renderKeys().catch(showError);
    if (admin) renderUsers().catch(showError);
  });
  $("#change-password").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    try {
      await api("POST", "/api/auth/password", { current: form.elements.current.value, new: form.elements.new.value });
      location.href = "/"; // every session ended: log in again with the new password
    } catch (error) {
      showError(error);
    }
  });
  $("#logout-everywhere").addEventListener("click", async () => {
    await api("POST", "/api/auth/logout-everywhere").catch(showError);
    location.href = "/";
  });
  $("#create-key").addEventListener("click", async () => {
    try {
      const key = await api("POST", "/api/keys", { name: "web" });
      const secret = $("#new-key-secret");
      const copy = el("button", { type: "button", class: "small" }, t("copy"));
      copy.addEventListener("click", async () => (await copyText(key.key)) && flash(copy, t("copied")));
      secret.replaceChildren(t("keyShown"), " ", el("code", {}, key.key), " ", copy);
      secret.hidden = false;
      renderKeys();
    } catch (error) {
      showError(error);
    }
  });
  $("#create-user").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    try {
      await api("POST", "/api/auth/register", { name: form.elements.name.value, password: form.elements.password.value });
      form.reset();
      flash(form.querySelector("button"));
      renderUsers().catch(showError);
    } catch (error) {
      showError(error);
    }
  });
  $("#logout").addEventListener("click", async () => {
    await api("POST", "/api/auth/logout").catch(showError);
    location.href = "/";
  });
}

/** Show the login dialog until someone logs in; the first account on a server registers. */
export function login(firstAccount) {
  const dialog = $("#login-dialog");
  const form = $("#login-form");
  $("#first-account").hidden = !firstAccount;
  $("#login-submit").textContent = firstAccount ? t("register") : t("login");
  dialog.oncancel = (event) => event.preventDefault(); // Esc does not skip it
  dialog.showModal();
  return new Promise((resolve) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const credentials = { name: form.elements.name.value, password: form.elements.password.value };
      try {
        if (firstAccount) {
          // The operator's one-time setup link (printed by `tertulia serve`) carries the token.
          const setupToken = new URLSearchParams(location.search).get("setup");
          await api("POST", "/api/auth/register", { ...credentials, setup_token: setupToken });
          history.replaceState(null, "", location.pathname);
        }
        const session = await api("POST", "/api/auth/login", credentials);
        dialog.close();
        resolve(session);
      } catch (error) {
        $("#login-error").textContent = error.message;
      }
    });
  });
}

export function installPanels(startChat) {
  installSettings();
  installPersonas(startChat);
  installAccount();
  for (const button of document.querySelectorAll(".close-dialog")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
}

/** Ask for the server's API key (shown again, with the server's message, when one was refused). */
export function askKey(message) {
  const dialog = $("#key-dialog");
  const form = $("#key-form");
  $("#key-error").textContent = localStorage.getItem("tertulia.key") ? message : "";
  dialog.oncancel = (event) => event.preventDefault(); // Esc does not skip it
  dialog.showModal();
  return new Promise((resolve) => {
    form.addEventListener(
      "submit",
      (event) => {
        event.preventDefault();
        dialog.close();
        resolve(form.elements.key.value.trim());
      },
      { once: true },
    );
  });
}
