"""Ordinary single-turn chat examples (English and Spanish), written for this project.

Mixed into the identity fine-tuning data so general behaviour is kept; some are held out for perplexity.
"""

from __future__ import annotations

CHAT: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("How many days are in a week?", "A week has seven days."),
        ("What is 12 times 3?", "12 times 3 is 36."),
        (
            "Give me a tip to sleep better.",
            "Keep a regular schedule: go to bed and wake up at the same time every day.",
        ),
        ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
        ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
        (
            "What is water made of?",
            "Water is made of hydrogen and oxygen: two hydrogen atoms for each oxygen atom.",
        ),
        ("Name three fruits.", "Apples, bananas and oranges."),
        ("How do I say thank you in French?", "In French, thank you is 'merci'."),
        (
            "What is the largest planet in our solar system?",
            "Jupiter is the largest planet in our solar system.",
        ),
        (
            "Write a short greeting for a birthday card.",
            "Happy birthday! I hope your day is full of joy and good company.",
        ),
        ("What does a thermometer measure?", "A thermometer measures temperature."),
        (
            "What is the boiling point of water at sea level?",
            "At sea level, water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
        ),
        (
            "What is the longest river in South America?",
            "The Amazon is the longest river in South America, and one of the longest in the world.",
        ),
        ("What is 45 divided by 9?", "45 divided by 9 is 5, because 9 times 5 is 45."),
        (
            "How do I boil an egg?",
            "Put the egg in boiling water for about nine minutes for a "
            "firm yolk, then cool it in cold water.",
        ),
        (
            "How much water should I drink each day?",
            "Many adults need about two litres a day, but it varies with activity and climate, "
            "so drink when you feel thirsty.",
        ),
        (
            "Translate 'where is the library?' into Spanish.",
            "'Where is the library?' in Spanish is '¿Dónde está la biblioteca?'.",
        ),
        (
            "What does 'photosynthesis' mean?",
            "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide "
            "into sugar and oxygen.",
        ),
        (
            "Write a short thank-you note to a neighbour.",
            "Thank you so much for watering my plants while I was away. I really appreciate your kindness!",
        ),
        (
            "How can I stay focused while working?",
            "Put your phone away, work on one task at a time, and take a short break every hour or so.",
        ),
        (
            "Who was the first person to walk on the Moon?",
            "Neil Armstrong was the first person to walk on the Moon, in July 1969, "
            "during the Apollo 11 mission.",
        ),
        (
            "What is a computer's RAM used for?",
            "RAM is short-term memory that a computer uses to hold the programs and data "
            "it is working with right now.",
        ),
        (
            "Why do we have seasons?",
            "Seasons happen because the Earth's axis is tilted, so each hemisphere gets more direct "
            "sunlight at different times of the year.",
        ),
        (
            "What is the capital of Japan?",
            "The capital of Japan is Tokyo, one of the largest cities in the world.",
        ),
        (
            "What is 15 percent of 200?",
            "15 percent of 200 is 30, because 10 percent is 20 and 5 percent is half of that, 10.",
        ),
        (
            "How long should I cook pasta?",
            "Most dried pasta cooks in 8 to 12 minutes in salted boiling water; check the packet "
            "and taste it before draining.",
        ),
        (
            "Give me a tip for a healthier diet.",
            "Fill half your plate with vegetables and fruit, and choose water instead of sugary drinks "
            "most of the time.",
        ),
        (
            "What is the plural of 'mouse'?",
            "The plural of 'mouse' is 'mice', for both the animal and, usually, the computer device.",
        ),
        (
            "What is a synonym?",
            "A synonym is a word that means the same or nearly the same as another word, "
            "like 'happy' and 'glad'.",
        ),
        (
            "Write a one-sentence invitation to a picnic.",
            "Join us for a picnic in the park this Saturday at noon; "
            "bring a blanket and your favourite snack!",
        ),
        (
            "How can I make a good first impression at a job interview?",
            "Arrive on time, dress neatly, smile, and prepare a few "
            "examples of your past work to talk about.",
        ),
        (
            "When did World War II end?",
            "World War II ended in 1945, with Germany surrendering in May and Japan in September.",
        ),
        (
            "What is Wi-Fi?",
            "Wi-Fi is a wireless technology that lets devices such as phones and laptops connect "
            "to the internet without cables.",
        ),
        (
            "What gas do humans breathe out?",
            "Humans breathe out carbon dioxide, along with nitrogen, some unused oxygen and water vapour.",
        ),
        (
            "Which continent is Egypt in?",
            "Egypt is in Africa, in the north-east of the continent, "
            "although the Sinai Peninsula is in Asia.",
        ),
        ("What is the square root of 81?", "The square root of 81 is 9, because 9 times 9 equals 81."),
        (
            "How do I say 'see you later' in Italian?",
            "In Italian, 'see you later' is 'a dopo' or, more casually, 'ci vediamo'.",
        ),
        (
            "Who painted the Mona Lisa?",
            "Leonardo da Vinci painted the Mona Lisa in the early "
            "1500s; it now hangs in the Louvre in Paris.",
        ),
        (
            "What is a password manager?",
            "A password manager is an app that stores your passwords securely and can create strong, "
            "unique ones for each account.",
        ),
    ],
    "es": [
        ("¿Cuál es la capital de España?", "La capital de España es Madrid."),
        ("¿Cuántos meses tiene un año?", "Un año tiene doce meses."),
        ("¿Cuánto es 7 más 5?", "7 más 5 son 12."),
        (
            "Dame un consejo para estudiar mejor.",
            "Estudia en sesiones cortas con descansos, y repasa al día siguiente.",
        ),
        ("¿De qué color es la hierba?", "La hierba suele ser verde."),
        ("Traduce 'gracias' al inglés.", "'Gracias' en inglés es 'thank you'."),
        (
            "¿Qué animal es conocido como el rey de la selva?",
            "El león es conocido como el rey de la selva.",
        ),
        ("Nombra tres colores.", "Rojo, azul y amarillo."),
        ("¿Cuál es el océano más grande?", "El océano Pacífico es el más grande."),
        ("Escribe un saludo corto para un amigo.", "¡Hola! Espero que estés muy bien. ¡Un abrazo!"),
        ("¿Qué mide un reloj?", "Un reloj mide el tiempo."),
        ("¿Cuántas patas tiene una araña?", "Una araña tiene ocho patas."),
        (
            "¿A qué temperatura hierve el agua?",
            "Al nivel del mar, el agua hierve a 100 grados centígrados.",
        ),
        (
            "¿Cuál es el río más largo de Europa?",
            "El Volga, en Rusia, es el río más largo de Europa, con unos 3.500 kilómetros.",
        ),
        (
            "¿Cuánto es 9 por 8?",
            "9 por 8 son 72. Un truco: es lo mismo que 10 por 8 menos 8.",
        ),
        (
            "¿Cómo preparo una tortilla de patatas?",
            "Fríe patatas y cebolla en aceite de oliva, mézclalas con huevo batido y sal, "
            "y cuaja la tortilla por ambos lados en la sartén.",
        ),
        (
            "Dame un consejo para cuidar la espalda.",
            "Mantén la espalda recta al sentarte, levántate cada hora para estirarte "
            "y dobla las rodillas al levantar peso.",
        ),
        (
            "Traduce 'buenas noches' al francés.",
            "'Buenas noches' en francés es 'bonne nuit' al despedirse, o 'bonsoir' como saludo por la noche.",
        ),
        (
            "¿Qué significa la palabra 'efímero'?",
            "'Efímero' significa que dura muy poco tiempo, como una pompa de jabón "
            "o una flor que se marchita pronto.",
        ),
        (
            "Escribe una frase para felicitar a alguien por su nuevo trabajo.",
            "¡Enhorabuena por tu nuevo trabajo! Te lo mereces y seguro que te irá genial.",
        ),
        (
            "¿Cómo puedo ahorrar dinero cada mes?",
            "Apunta tus gastos, fija un presupuesto y aparta una "
            "cantidad fija para ahorrar en cuanto cobres.",
        ),
        (
            "¿En qué año llegó Colón a América?",
            "Cristóbal Colón llegó a América en 1492, al desembarcar en una isla de las Bahamas.",
        ),
        (
            "¿Qué es un navegador web?",
            "Un navegador web es un programa, como Firefox o Chrome, "
            "que sirve para visitar páginas de internet.",
        ),
        (
            "¿Por qué el cielo es azul?",
            "Porque el aire dispersa más la luz azul del sol que los otros colores, "
            "y esa luz nos llega desde todas direcciones.",
        ),
        (
            "¿Cuál es la capital de Argentina?",
            "La capital de Argentina es Buenos Aires, una ciudad situada a orillas del Río de la Plata.",
        ),
        ("¿Cuánto es la mitad de 150?", "La mitad de 150 es 75, porque 75 más 75 son 150."),
        (
            "¿Cuánto tiempo se cuece un huevo duro?",
            "Un huevo duro se cuece unos diez minutos en agua hirviendo; después, pásalo por agua fría "
            "para pelarlo mejor.",
        ),
        (
            "¿Cuántas horas debería dormir un adulto?",
            "La mayoría de los adultos necesita entre siete y nueve "
            "horas de sueño cada noche para descansar bien.",
        ),
        (
            "¿Cuál es el plural de 'lápiz'?",
            "El plural de 'lápiz' es 'lápices': la zeta se convierte en ce delante de la e.",
        ),
        (
            "¿Qué es un antónimo?",
            "Un antónimo es una palabra de significado contrario al de otra, como 'alto' y 'bajo'.",
        ),
        (
            "Escribe un mensaje corto para invitar a unos amigos a cenar.",
            "¡Hola a todos! El sábado a las nueve hago una cena en casa. ¿Os apetece venir?",
        ),
        (
            "Dame un consejo para hablar en público.",
            "Prepara bien el tema, ensaya en voz alta varias veces y "
            "respira despacio antes de empezar a hablar.",
        ),
        (
            "¿Quién escribió Don Quijote de la Mancha?",
            "Miguel de Cervantes escribió Don Quijote de la Mancha; la primera parte se publicó en 1605.",
        ),
        (
            "¿Qué es la nube en informática?",
            "La nube son servidores en internet donde puedes guardar archivos y usar programas "
            "sin tenerlos en tu propio ordenador.",
        ),
        (
            "¿Qué planeta está más cerca del Sol?",
            "Mercurio es el planeta más cercano al Sol y también el más pequeño del sistema solar.",
        ),
        (
            "¿En qué continente está Perú?",
            "Perú está en América del Sur, en la costa del océano Pacífico, y su capital es Lima.",
        ),
        (
            "¿Cuántos lados tiene un hexágono?",
            "Un hexágono tiene seis lados y seis ángulos, como las celdas de un panal de abejas.",
        ),
        (
            "¿Cómo se dice 'mariposa' en inglés?",
            "'Mariposa' en inglés se dice 'butterfly', y 'oruga' se dice 'caterpillar'.",
        ),
        (
            "¿Qué órgano bombea la sangre por el cuerpo?",
            "El corazón es el órgano que bombea la sangre por todo el "
            "cuerpo a través de las arterias y las venas.",
        ),
        (
            "¿Para qué sirve una contraseña segura?",
            "Una contraseña segura protege tus cuentas; conviene que sea larga, que mezcle letras, "
            "números y símbolos, y que no la repitas.",
        ),
    ],
}
