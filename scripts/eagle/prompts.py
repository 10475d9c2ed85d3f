"""Chat prompts for self-distillation, made from templates and word lists (no data set).

Two disjoint sets:
- train: questions, instructions, code (Python), lists, stories and arithmetic, from the
  TRAIN templates and topics;
- heldout: other templates over other topics (comparisons, how-to, JavaScript, poems, rate
  and unit problems, explanations for children, advice, product copy), so that evaluation
  measures how the head generalizes rather than how well it remembers.

Writes a JSON file with each prompt's text and its token ids under the target's chat template:
    python scripts/eagle/prompts.py --gguf MODEL.gguf --out .dev/eagle-data/prompts.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random

SCIENCE = [
    "photosynthesis", "gravity", "black holes", "the water cycle", "DNA", "volcanoes", "electricity",
    "magnetism", "the immune system", "plate tectonics", "climate change", "the greenhouse effect",
    "evolution", "vaccines", "the speed of light", "atoms", "chemical bonds", "the solar system",
    "earthquakes", "ocean tides", "the human heart", "sound waves", "nuclear fusion", "bacteria",
    "the moon's phases", "weather forecasting", "the periodic table", "friction", "cells",
    "the nervous system", "erosion", "hurricanes", "antibiotics", "the ozone layer", "genetics",
]
HISTORY = [
    "the Roman Empire", "the printing press", "the Industrial Revolution", "ancient Egypt",
    "the French Revolution", "the Silk Road", "the Renaissance", "the first moon landing",
    "the invention of the telephone", "the Great Wall of China", "the Cold War", "the Vikings",
    "ancient Greece", "the steam engine", "the Aztec Empire", "the Wright brothers",
]
TECH = [
    "the internet", "lithium batteries", "machine learning", "cloud computing", "encryption",
    "GPS", "solar panels", "electric cars", "3D printing", "blockchain", "computer memory",
    "operating systems", "compilers", "Wi-Fi", "search engines", "databases", "smartphones",
]
QUESTION_TEMPLATES = [
    "What is {t}?", "Explain how {t} works.", "Why is {t} important?", "Can you tell me about {t}?",
    "Give me a brief overview of {t}.", "What are some interesting facts about {t}?",
    "How would you describe {t} in simple terms?", "What should everyone know about {t}?",
]
PEOPLE = ["my manager", "a colleague", "my landlord", "a customer", "my teacher", "a new client", "my team", "a friend"]
SUBJECTS = [
    "a delayed project", "a meeting next week", "a broken heater", "a late payment", "a job offer",
    "a change of schedule", "a thank-you for their help", "a request for feedback", "a vacation request",
]
ACTIVITIES = [
    "staying focused", "learning a new language", "saving money", "sleeping better", "running a marathon",
    "public speaking", "studying for exams", "working from home", "keeping plants alive", "eating healthier",
    "writing clearly", "managing stress", "starting a small business", "taking better photos",
]
THINGS = [
    "regular exercise", "reading books", "drinking water", "learning to code", "meditation",
    "volunteering", "recycling", "walking every day", "keeping a journal", "having a routine",
]
SENTENCES = [
    "hey can u send me the file asap", "we gotta fix this bug before friday", "the meeting was kinda useless",
    "i think the plan is not so good", "thanks a lot for the stuff you did", "this product is super cool",
]
INSTRUCTION_TEMPLATES = [
    "Write a short email to {person} about {subject}.",
    "Give me {n} tips for {activity}.",
    "Summarize the benefits of {thing} in {n} sentences.",
    "Rewrite this sentence to be more formal: \"{sentence}\"",
    "Write a to-do list for {activity}.",
    "Explain the pros and cons of {thing}.",
]
PY_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "sorts a list of dictionaries by a given key", "counts how often each word appears in a text",
    "reads a CSV file and prints each row", "returns the n-th Fibonacci number",
    "removes duplicates from a list while keeping the order", "checks whether a string is a palindrome",
    "finds the largest number in a list", "merges two sorted lists", "converts Celsius to Fahrenheit",
    "flattens a nested list", "computes the average of a list of numbers", "validates an email address",
    "counts the vowels in a string", "returns the greatest common divisor of two numbers",
    "finds all even numbers in a list", "capitalizes the first letter of every word",
    "implements binary search", "reads a JSON file into a dictionary", "generates a random password",
]
CODE_TEMPLATES = [
    "Write a Python function that {task}.", "How do I write a Python function that {task}?",
    "Show me Python code that {task}, with a short explanation.", "Write a Python class with a method that {task}.",
]
LIST_THINGS = [
    "fruits that are high in vitamin C", "countries in Europe", "famous scientists", "programming languages",
    "healthy breakfast ideas", "board games for families", "ways to reduce waste at home",
    "animals that live in the ocean", "musical instruments", "hobbies you can do indoors",
    "common interview questions", "capital cities in Asia", "vegetables that grow quickly",
    "classic novels", "types of clouds", "inventions of the 20th century", "birds found in North America",
]
LIST_TEMPLATES = ["List {n} {things}.", "Name {n} {things}.", "Can you give me a list of {n} {things}?", "What are {n} {things}?"]
CHARACTERS = [
    "a brave mouse", "a lonely robot", "a young wizard", "an old fisherman", "a curious cat", "a lost dragon",
    "a clever fox", "a little girl named Mia", "a knight without a sword", "a talking tree", "a space explorer",
    "a shy giraffe", "a baker named Tom",
]
EVENTS = [
    "finds a hidden door", "learns to fly", "makes a new friend", "saves the village", "discovers a treasure map",
    "gets lost in a forest", "wins a race", "travels to the moon", "loses something important", "meets a ghost",
]
STORY_TEMPLATES = [
    "Write a short story about {character} who {event}.", "Tell me a bedtime story about {character} who {event}.",
    "Write a story in three paragraphs about {character} who {event}.",
]
NAMES = ["Anna", "Ben", "Carlos", "Dana", "Emma", "Farid", "Grace", "Hiro", "Ivy", "Jack", "Lena", "Omar"]
ITEMS = ["apples", "pencils", "books", "marbles", "stickers", "cookies", "coins", "cards"]


def math_prompts(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(100, 999)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        out.append(rng.choice([
            f"What is {a} + {b}?",
            f"What is {a} times {b}?",
            f"What is {c} minus {a}?",
            f"Solve for x: {a}x + {b} = {c}.",
            f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
            f"What is {a}% of {c}?",
            f"{name} has {c} {item} and gives away {a}. How many are left?",
            f"Is {c} divisible by {a % 9 + 2}? Explain.",
        ]))
    return out


def train_prompts(rng: random.Random, rng_seed_broad: int = 1) -> list[tuple[str, str]]:
    """(category, text) pairs from the training templates."""
    out = []
    for tpl, t in itertools.product(QUESTION_TEMPLATES, SCIENCE + HISTORY + TECH):
        out.append(("question", tpl.format(t=t)))
    for _ in range(400):
        tpl = rng.choice(INSTRUCTION_TEMPLATES)
        out.append(("instruction", tpl.format(
            person=rng.choice(PEOPLE), subject=rng.choice(SUBJECTS), n=rng.randint(3, 7),
            activity=rng.choice(ACTIVITIES), thing=rng.choice(THINGS), sentence=rng.choice(SENTENCES))))
    for tpl, task in itertools.product(CODE_TEMPLATES, PY_TASKS):
        out.append(("code", tpl.format(task=task)))
    for tpl, things in itertools.product(LIST_TEMPLATES, LIST_THINGS):
        out.append(("list", tpl.format(n=rng.randint(3, 10), things=things)))
    for tpl, ch, ev in itertools.product(STORY_TEMPLATES, CHARACTERS, EVENTS):
        out.append(("story", tpl.format(character=ch, event=ev)))
    out += [("math", p) for p in math_prompts(rng, 300)]
    out += broad_prompts(random.Random(rng_seed_broad), 1500)  # own generator: the sets above stay as they were
    return sorted(set(out))


# Broad prompts: many everyday topics under many generic templates, so that the head sees
# varied answer styles rather than a few formulaic ones.
TOPICS = [t.strip() for t in """
umbrellas, bicycles, libraries, bridges, lighthouses, volcanic islands, deserts, rainforests, glaciers, rivers,
honeybees, octopuses, elephants, penguins, wolves, owls, dolphins, ants, butterflies, horses, frogs, sharks,
firefighters, nurses, architects, farmers, pilots, librarians, carpenters, astronauts, journalists, chefs, judges,
chess, football, basketball, tennis, yoga, skiing, surfing, rock climbing, gardening, knitting, painting, pottery,
photography, chemistry, geometry, algebra, statistics, astronomy, geology, biology, psychology, economics,
philosophy, linguistics, archaeology, architecture, music theory, jazz, opera, hip hop, classical music,
violins, pianos, drums, guitars, movies, theaters, museums, zoos, airports, train stations, hospitals, schools,
universities, markets, supermarkets, restaurants, bakeries, hotels, castles, pyramids, temples,
honesty, patience, courage, kindness, curiosity, creativity, leadership, teamwork, responsibility,
time management, motivation, habits, memory, dreams, sleep, laughter, happiness, gratitude, forgiveness,
cheese, chocolate, honey, apples, oranges, tomatoes, potatoes, mushrooms, olive oil, spices, salt,
clocks, mirrors, keys, candles, maps, compasses, telescopes, microscopes, cameras, radios, printers, robots, drones,
rockets, satellites, submarines, ships, sailboats, trucks, motorcycles, helicopters, hot air balloons, elevators,
electric guitars, keyboards, smartwatches, passwords, spreadsheets, websites, video games,
social media, podcasts, newspapers, online shopping, remote work, public transport,
plastic pollution, renewable energy, wind turbines, thunderstorms, the wind,
caves, islands, lakes, waterfalls, forests, meadows, beaches, oceans, the night sky, stars, comets,
birthdays, weddings, holidays, festivals, parades, picnics, road trips, family dinners, game nights,
banks, taxes, budgets, savings accounts, credit cards, insurance, investing, inflation, trade,
democracy, elections, laws, courts, human rights, history books, languages, alphabets,
handwritten letters, calligraphy, novels, fairy tales, myths, legends, superheroes, detectives, pirates,
knights, dragons, wizards, aliens, time travel, inventions, patents, engineers, scientists, doctors, teachers,
vitamins, exercise, running, walking, breathing, posture, stretching, first aid, hydration,
dinosaurs, fossils, mammoths, tornadoes, floods, droughts, wildfires, seasons
""".split(",")]
BROAD_TEMPLATES = [
    "Write a short paragraph about {w}.", "Tell me something surprising about {w}.",
    "Describe {w} to someone who has never seen them.", "What are the most common questions people ask about {w}?",
    "Write a short dialogue between two friends talking about {w}.", "Create a quiz question about {w} and give the answer.",
    "Write the opening paragraph of a novel that involves {w}.", "What is the history of {w}?",
    "Write a persuasive paragraph on why people should care about {w}.", "Give three examples of how {w} affect daily life.",
    "Write a diary entry from the point of view of someone who loves {w}.", "What would the world be like without {w}?",
    "Write a news headline and a short article about {w}.", "Outline a five-minute presentation about {w}.",
    "What are some common myths about {w}?", "Write a riddle whose answer is {w}, then explain it.",
    "How have {w} changed over the last hundred years?", "Write a tweet announcing an event about {w}.",
]
MORE_CODE = [
    "Write a SQL query that {t}.", "Write a bash command that {t}.", "Write a C function that {t}.",
    "Explain what this Python line does: {t}",
]
SQL_TASKS = ["lists all customers from Canada", "counts orders per month", "finds the ten most expensive products",
             "deletes rows older than one year", "joins users with their latest order"]
BASH_TASKS = ["counts the lines in every .txt file", "finds files larger than 100 MB", "renames all .jpeg files to .jpg",
              "shows the five biggest folders", "prints the current date in ISO format"]
C_TASKS = ["swaps two integers", "returns the length of a string", "reverses an array in place", "sums the digits of a number"]
PY_LINES = ["squares = [x * x for x in range(10)]", "data = dict(zip(keys, values))", "print(sorted(words, key=len))",
            "total = sum(n for n in nums if n % 2 == 0)", "with open('a.txt') as f: lines = f.readlines()"]


def broad_prompts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    out = set()
    while len(out) < count:
        out.add(("broad", rng.choice(BROAD_TEMPLATES).format(w=rng.choice(TOPICS))))
    for tpl, tasks in zip(MORE_CODE, [SQL_TASKS, BASH_TASKS, C_TASKS, PY_LINES]):
        out |= {("code2", tpl.format(t=t)) for t in tasks}
    for _ in range(60):
        a, b = rng.randint(12, 999), rng.randint(2, 30)
        out.add(("math2", rng.choice([f"Calculate {a} divided by {b}.", f"What is the square of {b}?",
                                      f"Round {a * 7 + 0.37} to the nearest whole number.", f"Is {a} an even or an odd number?",
                                      f"What is {a} plus {b} times 2?"])))
    return sorted(out)


# Held-out: none of these templates or topics appear above.
PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("Python", "Java"), ("renting", "buying a home"),
    ("email", "instant messaging"), ("paper books", "e-readers"), ("city life", "country life"),
    ("a laptop", "a desktop computer"), ("swimming", "cycling"),
]
DISHES = ["pancakes", "tomato soup", "fried rice", "banana bread", "guacamole", "a vegetable curry", "lemonade", "pizza dough"]
PLACES = ["Iceland", "Japan", "a beach town", "the mountains in winter", "Morocco", "a camping weekend"]
JS_TASKS = [
    "shuffles an array", "debounces another function", "formats a date as YYYY-MM-DD", "deep-clones an object",
    "turns a query string into an object", "checks whether two arrays are equal",
]
POEM_SUBJECTS = ["autumn leaves", "the sea at night", "a city waking up", "an old friendship", "the first snow", "a cup of coffee"]
KID_TOPICS = ["rainbows", "money", "why the sky is blue", "how airplanes fly", "where rain comes from", "what a computer does"]
FEELINGS = [("nervous", "a job interview tomorrow"), ("overwhelmed", "too much homework"),
            ("bored", "my daily routine"), ("unsure", "changing careers"), ("sad", "moving to a new city")]
PRODUCTS = ["a reusable water bottle", "noise-cancelling headphones", "a standing desk", "a smart thermostat", "hiking boots"]


def heldout_prompts(rng: random.Random) -> list[tuple[str, str]]:
    out = [("compare", f"What are the main differences between {a} and {b}?") for a, b in PAIRS]
    out += [("howto", f"How do I make {d} at home?") for d in DISHES]
    out += [("howto", f"What should I pack for a trip to {p}?") for p in PLACES]
    out += [("code", f"Write a JavaScript function that {t}.") for t in JS_TASKS]
    out += [("poem", f"Write a short poem about {s}.") for s in POEM_SUBJECTS]
    out += [("kids", f"Explain {t} to a five-year-old.") for t in KID_TOPICS]
    out += [("advice", f"I feel {f} about {s}. What should I do?") for f, s in FEELINGS]
    out += [("product", f"Write a product description for {p}.") for p in PRODUCTS]
    for _ in range(10):
        km, h, m = rng.randint(60, 600), rng.randint(2, 8), rng.randint(70, 500)
        out.append(("math", rng.choice([
            f"If a train travels {km} km in {h} hours, what is its average speed?",
            f"Convert {m} minutes to hours and minutes.",
        ])))
    return out


def tokenize(gguf_path: str, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as a one-turn chat, under the model's own chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path))
    out = []
    for text in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the target model (its tokenizer and chat template)")
    ap.add_argument("--out", default=".dev/eagle-data/prompts.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sets = {"train": train_prompts(rng), "heldout": heldout_prompts(rng)}
    train_texts = {t for _, t in sets["train"]}
    assert not any(t in train_texts for _, t in sets["heldout"]), "held-out prompt also in train"
    doc = {}
    for name, pairs in sets.items():
        ids = tokenize(args.gguf, [t for _, t in pairs])
        doc[name] = [{"category": c, "text": t, "ids": i} for (c, t), i in zip(pairs, ids)]
        cats = sorted({c for c, _ in pairs})
        print(f"{name}: {len(pairs)} prompts; " + ", ".join(f"{c} {sum(x == c for x, _ in pairs)}" for c in cats))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    main()
