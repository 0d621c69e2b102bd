// The settings panel (a Playground-style set of sampling controls and the system prompt), the
// assistants ("personas": a name, instructions, a default model and temperature), and the account.

import { api } from "./api.js";
import { t } from "./i18n.js";
import { state, emit, current, on } from "./state.js";
import { el, $, showError, debounce, copyText, flash } from "./ui.js";

// What the server uses when nothing is set (replies_api.DEFAULT_SETTINGS); shown, not stored.
const DEFAULTS = { temperature: 0.3, top_p: 0.9, repetition_penalty: 1.1, frequency_penalty: 0, presence_penalty: 0 };
const NUMBERS = ["temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "repetition_penalty", "seed"];

// --- settings ------------------------------------------------------------------------------------

function effective(fields) {
  const persona = state.personas.find((p) => p.id === fields.persona_id);
  return { ...DEFAULTS, ...(persona ? persona.settings : {}), ...(fields.settings || {}) };
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

async function saveSettings() {
  const form = $("#settings-form");
  const fields = { settings: readSettings(), system_prompt: form.elements.system_prompt.value || null };
  if (!state.conversation) {
    Object.assign(state.draft, fields);
    return;
  }
  try {
    const updated = await api("PATCH", `/api/conversations/${state.conversation.id}`, fields);
    Object.assign(state.conversation, { settings: updated.settings, system_prompt: updated.system_prompt });
    emit("settings", updated);
  } catch (error) {
    showError(error);
  }
}

function installSettings() {
  const panel = $("#settings-panel");
  const form = $("#settings-form");
  const save = debounce(saveSettings, 400);
  form.addEventListener("input", (event) => {
    const output = event.target.parentElement.querySelector("output");
    if (output) output.textContent = event.target.value;
    save();
  });
  form.addEventListener("submit", (event) => event.preventDefault());
  $("#reset-settings").addEventListener("click", async () => {
    current().settings = {};
    fillSettings();
    form.elements.system_prompt.value = current().system_prompt || "";
    await saveSettings();
    fillSettings();
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

function installAccount() {
  const dialog = $("#account-dialog");
  $("#open-account").addEventListener("click", async () => {
    $("#account-name").textContent = state.user ? state.user.name : "";
    $("#create-user").hidden = !(state.user && state.user.is_admin);
    $("#new-key-secret").hidden = true;
    dialog.showModal();
    renderKeys().catch(showError);
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
  dialog.addEventListener("cancel", (event) => event.preventDefault()); // Esc does not skip it
  dialog.showModal();
  return new Promise((resolve) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const credentials = { name: form.elements.name.value, password: form.elements.password.value };
      try {
        if (firstAccount) await api("POST", "/api/auth/register", credentials);
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
  dialog.addEventListener("cancel", (event) => event.preventDefault());
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
