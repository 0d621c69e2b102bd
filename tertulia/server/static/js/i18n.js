// Interface text in English and Spanish. The language comes from the browser, can be switched, and is
// remembered. Elements name their text with data-i18n (content), data-i18n-placeholder, -title, -aria.

const TEXT = {
  en: {
    newChat: "New chat",
    search: "Search chats",
    assistants: "Assistants",
    reports: "Evaluation reports",
    settings: "Settings",
    theme: "Theme",
    language: "Language",
    send: "Send",
    stop: "Stop",
    placeholder: "Message Tertulia…",
    hint: "Enter to send · Shift+Enter for a new line · Esc to stop",
    today: "Today",
    yesterday: "Yesterday",
    week: "Previous 7 days",
    older: "Older",
    rename: "Rename",
    delete: "Delete",
    confirmDelete: "Delete “{title}”? This cannot be undone.",
    copy: "Copy",
    copied: "Copied",
    copyCode: "Copy code",
    edit: "Edit",
    regenerate: "Regenerate",
    good: "Good reply",
    bad: "Bad reply",
    saveSend: "Save & send",
    cancel: "Cancel",
    save: "Save",
    close: "Close",
    incomplete: "Stopped: the reply is incomplete.",
    tokensSpeed: "{tokens} tokens · {speed} tok/s",
    tokensOnly: "{tokens} tokens",
    contextMeter: "{used} / {context} tokens",
    contextTitle: "Tokens this conversation sends to the model, out of its context",
    dropped: "{count} earlier message(s) left out to fit the model's context.",
    empty: "How can I help you today?",
    emptyPersona: "You are talking to {name}.",
    noPersona: "No assistant",
    unavailable: "not served",
    model: "Model",
    systemPrompt: "System prompt",
    systemPromptHint: "Instructions for this conversation (added after the assistant's).",
    temperature: "Temperature",
    topP: "Top P",
    maxTokens: "Max tokens",
    frequencyPenalty: "Frequency penalty",
    presencePenalty: "Presence penalty",
    repetitionPenalty: "Repetition penalty",
    seed: "Seed",
    stopSequences: "Stop sequences (one per line)",
    reset: "Reset",
    defaultValue: "default",
    exportMarkdown: "Export Markdown",
    exportJson: "Export JSON",
    importJson: "Import JSON",
    personaName: "Name",
    personaInstructions: "Instructions (who the assistant is, how it speaks)",
    newPersona: "New assistant",
    startChat: "Chat",
    noPersonas: "No assistants yet. Give one a name and instructions: that is its identity.",
    login: "Log in",
    register: "Create account",
    logout: "Log out",
    userName: "User name",
    password: "Password",
    firstAccount: "No account exists yet: create the admin (this needs the setup link the server printed).",
    account: "Account",
    apiKeys: "API keys",
    apiKey: "API key",
    keyNeeded: "This server needs an API key (it was started with --api-key).",
    newKey: "New key",
    keyShown: "Copy this key now; it is not shown again:",
    revoke: "Revoke",
    newUser: "Create user",
    currentPassword: "Current password",
    newPassword: "New password (8+ characters)",
    changePassword: "Change password",
    users: "Users",
    disable: "Disable",
    enable: "Enable",
    logoutEverywhere: "Log out everywhere",
    tooLarge: "This is too large ({size}); the limit is {limit}.",
    badImport: "This file is not a Tertulia JSON export.",
    notFound: "This conversation does not exist, or is not yours.",
    offline: "The server cannot be reached.",
    menu: "Menu",
    options: "Conversation options",
    streamingElsewhere: "A reply is being written…",
    branch: "Version {index} of {count}",
  },
  es: {
    newChat: "Nuevo chat",
    search: "Buscar chats",
    assistants: "Asistentes",
    reports: "Informes de evaluación",
    settings: "Ajustes",
    theme: "Tema",
    language: "Idioma",
    send: "Enviar",
    stop: "Detener",
    placeholder: "Escribe a Tertulia…",
    hint: "Intro para enviar · Mayús+Intro para otra línea · Esc para detener",
    today: "Hoy",
    yesterday: "Ayer",
    week: "Últimos 7 días",
    older: "Anteriores",
    rename: "Renombrar",
    delete: "Borrar",
    confirmDelete: "¿Borrar «{title}»? No se puede deshacer.",
    copy: "Copiar",
    copied: "Copiado",
    copyCode: "Copiar código",
    edit: "Editar",
    regenerate: "Regenerar",
    good: "Buena respuesta",
    bad: "Mala respuesta",
    saveSend: "Guardar y enviar",
    cancel: "Cancelar",
    save: "Guardar",
    close: "Cerrar",
    incomplete: "Detenida: la respuesta está incompleta.",
    tokensSpeed: "{tokens} tokens · {speed} tok/s",
    tokensOnly: "{tokens} tokens",
    contextMeter: "{used} / {context} tokens",
    contextTitle: "Tokens que esta conversación envía al modelo, de su contexto",
    dropped: "{count} mensaje(s) anterior(es) quedaron fuera para caber en el contexto del modelo.",
    empty: "¿En qué puedo ayudarte hoy?",
    emptyPersona: "Estás hablando con {name}.",
    noPersona: "Sin asistente",
    unavailable: "no disponible",
    model: "Modelo",
    systemPrompt: "Prompt de sistema",
    systemPromptHint: "Instrucciones para esta conversación (tras las del asistente).",
    temperature: "Temperatura",
    topP: "Top P",
    maxTokens: "Máx. tokens",
    frequencyPenalty: "Penalización de frecuencia",
    presencePenalty: "Penalización de presencia",
    repetitionPenalty: "Penalización de repetición",
    seed: "Semilla",
    stopSequences: "Secuencias de parada (una por línea)",
    reset: "Restablecer",
    defaultValue: "por defecto",
    exportMarkdown: "Exportar Markdown",
    exportJson: "Exportar JSON",
    importJson: "Importar JSON",
    personaName: "Nombre",
    personaInstructions: "Instrucciones (quién es el asistente, cómo habla)",
    newPersona: "Nuevo asistente",
    startChat: "Chatear",
    noPersonas: "Aún no hay asistentes. Dale a uno un nombre e instrucciones: esa es su identidad.",
    login: "Entrar",
    register: "Crear cuenta",
    logout: "Salir",
    userName: "Usuario",
    password: "Contraseña",
    firstAccount: "Aún no hay cuentas: crea la de administración (hace falta el enlace de configuración que mostró el servidor).",
    account: "Cuenta",
    apiKeys: "Claves de API",
    apiKey: "Clave de API",
    keyNeeded: "Este servidor pide una clave de API (se inició con --api-key).",
    newKey: "Nueva clave",
    keyShown: "Copia esta clave ahora; no se volverá a mostrar:",
    revoke: "Revocar",
    newUser: "Crear usuario",
    currentPassword: "Contraseña actual",
    newPassword: "Contraseña nueva (8+ caracteres)",
    changePassword: "Cambiar contraseña",
    users: "Usuarios",
    disable: "Desactivar",
    enable: "Activar",
    logoutEverywhere: "Salir en todas partes",
    tooLarge: "Es demasiado grande ({size}); el límite es {limit}.",
    badImport: "Este archivo no es una exportación JSON de Tertulia.",
    notFound: "Esta conversación no existe o no es tuya.",
    offline: "No se puede contactar con el servidor.",
    menu: "Menú",
    options: "Opciones de la conversación",
    streamingElsewhere: "Se está escribiendo una respuesta…",
    branch: "Versión {index} de {count}",
  },
};

export const LANGUAGES = { en: "English", es: "Español" };

function initialLanguage() {
  const saved = localStorage.getItem("tertulia.lang");
  if (saved && TEXT[saved]) return saved;
  const browser = (navigator.language || "en").slice(0, 2).toLowerCase();
  return TEXT[browser] ? browser : "en";
}

let language = initialLanguage();

export function currentLanguage() {
  return language;
}

export function t(key, values = {}) {
  const template = TEXT[language][key] ?? TEXT.en[key] ?? key;
  return template.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

export function applyText(root = document) {
  document.documentElement.lang = language;
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-title]")) {
    el.title = t(el.dataset.i18nTitle);
    el.setAttribute("aria-label", el.title);
  }
}

export function setLanguage(next) {
  if (!TEXT[next]) return;
  language = next;
  localStorage.setItem("tertulia.lang", next);
  applyText();
}
