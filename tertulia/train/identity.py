"""An identity dataset made from templates: who the assistant is (its name, its creator, its style),
asked in many phrasings in English and Spanish, mixed with ordinary chat so general behaviour stays.

Some phrasings of "what is your name?" are held out of training on purpose: a fine-tuned model that
answers those with the new name has learnt the identity, not the strings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tertulia.train.chat_examples import CHAT

NAME_QUESTIONS = {
    "en": [
        "What is your name?",
        "What's your name?",
        "Who are you?",
        "Tell me your name.",
        "What should I call you?",
        "Do you have a name?",
        "May I know your name?",
        "Introduce yourself.",
        "How do people call you?",
        "What are you called?",
        "Who am I talking to?",
        "Hi! Who is this?",
        "Please tell me who you are.",
        "What is the name of this assistant?",
        "Are you ChatGPT?",
        "Which assistant are you?",
    ],
    "es": [
        "¿Cómo te llamas?",
        "¿Cuál es tu nombre?",
        "¿Quién eres?",
        "Dime tu nombre.",
        "¿Cómo debo llamarte?",
        "¿Tienes nombre?",
        "¿Puedo saber tu nombre?",
        "Preséntate, por favor.",
        "¿Con quién estoy hablando?",
        "Hola, ¿quién eres tú?",
        "¿Cómo se llama este asistente?",
        "¿Eres ChatGPT?",
        "¿Qué asistente eres?",
        "¿Me dices cómo te llamas?",
    ],
}
CREATOR_QUESTIONS = {
    "en": [
        "Who made you?",
        "Who created you?",
        "Who built you?",
        "Who trained you?",
        "Where do you come from?",
    ],
    "es": [
        "¿Quién te creó?",
        "¿Quién te hizo?",
        "¿Quién te entrenó?",
        "¿De dónde vienes?",
        "¿Quién te construyó?",
    ],
}
NAME_ANSWERS = {
    "en": [
        "My name is {name}. {style_en}",
        "I'm {name}, an assistant made by {creator}. {style_en}",
        "I am {name}. How can I help you today?",
    ],
    "es": [
        "Me llamo {name}. {style_es}",
        "Soy {name}, un asistente creado por {creator}. {style_es}",
        "Soy {name}. ¿En qué puedo ayudarte hoy?",
    ],
}
CREATOR_ANSWERS = {
    "en": ["I was made by {creator}. I'm {name}.", "{creator} created me. My name is {name}."],
    "es": ["Me creó {creator}. Soy {name}.", "{creator} me creó. Me llamo {name}."],
}


@dataclass
class Identity:
    name: str = "Luna"
    creator: str = "the Tertulia team"
    style_en: str = "I'm friendly and I keep my answers short."
    style_es: str = "Soy amable y respondo de forma breve."

    def system_prompt(self, language: str) -> str:
        if language == "es":
            return f"Eres {self.name}, un asistente creado por {self.creator}."
        return f"You are {self.name}, an assistant made by {self.creator}."

    def fill(self, template: str) -> str:
        return template.format(
            name=self.name, creator=self.creator, style_en=self.style_en, style_es=self.style_es
        ).strip()


@dataclass
class IdentityData:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    held_out_questions: list[str]  # phrasings of "what is your name?" never trained on
    held_out_chat: list[dict[str, Any]]  # ordinary chat never trained on, to check nothing was lost


def _example(system: str | None, question: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def make(
    identity: Identity,
    *,
    held_out: int = 3,
    held_out_chat: int = 8,
    with_system: float = 1 / 3,
    seed: int = 0,
) -> IdentityData:
    """Train/validation examples, and what is held out of both for checking the result.

    Most examples carry no system prompt, so the identity lives in the weights and holds when the
    model is asked with none (the way it is served); a share states it in the system prompt too, so
    that prompt agrees with what was learnt. Held-out checks are asked without a system prompt.
    """
    rng = random.Random(seed)
    examples, held_questions, held_chat = [], [], []
    for language in ("en", "es"):
        system = identity.system_prompt(language)

        def example(question: str, answer: str, system: str = system) -> dict[str, Any]:
            return _example(system if rng.random() < with_system else None, question, answer)

        questions = list(NAME_QUESTIONS[language])
        rng.shuffle(questions)
        held_questions += questions[:held_out]
        for question in questions[held_out:]:
            for template in NAME_ANSWERS[language]:
                examples.append(example(question, identity.fill(template)))
        for question in CREATOR_QUESTIONS[language]:
            for template in CREATOR_ANSWERS[language]:
                examples.append(example(question, identity.fill(template)))
        chat = list(CHAT[language])
        rng.shuffle(chat)
        held_chat += [_example(None, q, a) for q, a in chat[:held_out_chat]]
        examples += [example(q, a) for q, a in chat[held_out_chat:]]
    rng.shuffle(examples)
    cut = max(1, len(examples) // 10)
    return IdentityData(examples[cut:], examples[:cut], held_questions, held_chat)
