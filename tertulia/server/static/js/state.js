// What the page knows, in one place, and a tiny event bus so its parts stay independent:
// the sidebar, the chat view and the panels each listen for what they show.

export const state = {
  auth: false, // accounts are on (--auth)
  user: null,
  models: [], // [{id, local, context_length}]
  personas: [],
  conversations: [],
  search: "",
  // The open conversation (with `messages`, the shown branch), or null for a new, unsaved chat.
  conversation: null,
  // Settings, persona, model and system prompt of a chat not saved yet (saved on its first message).
  draft: { persona_id: null, model: null, system_prompt: null, settings: {} },
  streaming: null, // {controller, conversationId} while a reply streams from this tab
};

const listeners = new Map();

export function on(event, fn) {
  if (!listeners.has(event)) listeners.set(event, []);
  listeners.get(event).push(fn);
}

export function emit(event, detail) {
  for (const fn of listeners.get(event) || []) fn(detail);
}

/** Fields of the open conversation or the draft: what the next message will be sent with. */
export function current() {
  return state.conversation || state.draft;
}

export function personaById(id) {
  return state.personas.find((p) => p.id === id) || null;
}

/** The model a reply will use: the conversation's, else its persona's, else the server's default
 * (listed first by /api/models). Null when the one named is not served. */
export function modelFor(fields) {
  const persona = personaById(fields.persona_id);
  const wanted = fields.model || (persona && persona.model);
  if (wanted) return state.models.find((m) => m.id === wanted) || null;
  return state.models[0] || null;
}
