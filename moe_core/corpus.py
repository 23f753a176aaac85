"""Embedded default corpus: deterministic synthetic English-like text that needs no download.

The demo, the tests and the default training run all need *some* text on every machine, including
machines without internet access. Instead of shipping a data file we generate it: a seeded
``random.Random`` drives a set of templates (stories, facts about invented countries, arithmetic,
counting, dialogues, lists, code-like snippets). The text has enough regular structure that a tiny
language model visibly improves on it within a few hundred steps, and every "fact" it states is
consistent across the whole corpus (the capital of a country never changes, every sum is correct), so
evaluation loss measures learning rather than memorising noise.

Only ``random()``, ``randrange``, ``choice`` and ``shuffle`` of ``random.Random(int)`` are used, and
nothing iterates over a ``set``: those are the parts of the stdlib whose output is identical across
CPython 3.10-3.13 and independent of ``PYTHONHASHSEED``, so the corpus is byte-identical everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from moe_core.fileutil import write_text_atomic

__all__ = ["DEFAULT_NUM_CHARS", "SPLIT_SEEDS", "embedded_corpus", "number_to_words", "write_embedded_corpus"]

# Different seeds per split so that eval text is not a verbatim copy of train text. "valid" is for choosing
# settings (learning rates, inits: bench/upcycling_study.py), so that "eval" stays held out and is only reported.
SPLIT_SEEDS: dict[str, int] = {"train": 20_240_611, "eval": 77_031_919, "valid": 31_415_926}
DEFAULT_NUM_CHARS: dict[str, int] = {"train": 2_000_000, "eval": 200_000, "valid": 200_000}

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Word lists. Tuples (never sets) so iteration order is fixed.
# --------------------------------------------------------------------------------------------------

PEOPLE: tuple[tuple[str, str], ...] = (
    ("Mia", "she"),
    ("Tom", "he"),
    ("Lena", "she"),
    ("Omar", "he"),
    ("Ada", "she"),
    ("Ben", "he"),
    ("Nora", "she"),
    ("Sam", "he"),
    ("Ivy", "she"),
    ("Leo", "he"),
    ("Zoe", "she"),
    ("Max", "he"),
    ("Ruby", "she"),
    ("Finn", "he"),
    ("Elsa", "she"),
    ("Hugo", "he"),
    ("Maya", "she"),
    ("Theo", "he"),
    ("Lily", "she"),
    ("Oscar", "he"),
    ("Iris", "she"),
    ("Jack", "he"),
    ("Clara", "she"),
    ("Noah", "he"),
)
PLACES = (
    "a small village",
    "the old town",
    "a quiet farm",
    "the busy harbor",
    "a green valley",
    "a house by the river",
    "the edge of the forest",
    "a tall tower",
    "a cabin in the hills",
    "a little island",
    "the city by the sea",
    "a sunny meadow",
)
LOCATIONS = (
    "market",
    "library",
    "bakery",
    "river",
    "garden",
    "school",
    "park",
    "beach",
    "hill",
    "bridge",
    "station",
    "pond",
    "barn",
    "lighthouse",
)
ADJECTIVES = (
    "red",
    "blue",
    "green",
    "yellow",
    "small",
    "big",
    "old",
    "shiny",
    "wooden",
    "soft",
    "tiny",
    "bright",
    "heavy",
    "strange",
    "golden",
    "striped",
)
OBJECTS = (
    "ball",
    "kite",
    "book",
    "lamp",
    "hat",
    "box",
    "cup",
    "key",
    "map",
    "bell",
    "drum",
    "boat",
    "shell",
    "stone",
    "feather",
    "coin",
    "scarf",
    "clock",
)
FEELINGS = ("happy", "sad", "tired", "surprised", "proud", "curious", "calm", "excited")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "foggy")
PRAISE = ("beautiful", "wonderful", "lovely", "funny", "nice", "strange")
ROOMS = ("kitchen", "bedroom", "garden", "classroom", "office", "attic")
ROOM_THINGS = (
    "a table",
    "a chair",
    "a lamp",
    "a window",
    "a shelf",
    "a rug",
    "a clock",
    "a plant",
    "a bed",
    "a desk",
    "a mirror",
    "a basket",
    "a door",
    "a painting",
)
HOBBIES = ("reading", "painting", "swimming", "singing", "running", "drawing", "baking", "dancing")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# (singular, plural) countable foods for word problems and shopping lists.
FOODS: tuple[tuple[str, str], ...] = (
    ("apple", "apples"),
    ("pear", "pears"),
    ("egg", "eggs"),
    ("carrot", "carrots"),
    ("cookie", "cookies"),
    ("orange", "oranges"),
    ("plum", "plums"),
    ("lemon", "lemons"),
    ("cake", "cakes"),
    ("potato", "potatoes"),
    ("banana", "bananas"),
    ("tomato", "tomatoes"),
)

# Fixed animal facts: (name, plural, sound, number of legs).
ANIMALS: tuple[tuple[str, str, str, int], ...] = (
    ("cat", "cats", "meow", 4),
    ("dog", "dogs", "woof", 4),
    ("cow", "cows", "moo", 4),
    ("duck", "ducks", "quack", 2),
    ("sheep", "sheep", "baa", 4),
    ("horse", "horses", "neigh", 4),
    ("owl", "owls", "hoot", 2),
    ("frog", "frogs", "croak", 4),
    ("bee", "bees", "buzz", 6),
    ("spider", "spiders", "nothing", 8),
    ("hen", "hens", "cluck", 2),
    ("pig", "pigs", "oink", 4),
)

# Fixed invented world: (country, capital, language, flag color, famous food). Never changes, so every
# fact sentence in the corpus agrees with every other one.
COUNTRIES: tuple[tuple[str, str, str, str, str], ...] = (
    ("Zorvania", "Keltmoor", "Zorvish", "blue", "honey bread"),
    ("Pellaria", "Ostrin", "Pellan", "green", "plum soup"),
    ("Quendor", "Marivel", "Quendi", "red", "fish pie"),
    ("Talvessa", "Brightholm", "Talvic", "yellow", "apple cake"),
    ("Umbrith", "Saltgate", "Umbric", "purple", "smoked cheese"),
    ("Velmora", "Dunhollow", "Velmoran", "orange", "lemon tea"),
    ("Karthos", "Ivenport", "Karthian", "white", "rice balls"),
    ("Lirandel", "Faywick", "Lirandi", "silver", "berry jam"),
    ("Norrhaven", "Coldspire", "Norric", "gray", "potato soup"),
    ("Ebrosia", "Sunmere", "Ebrosian", "gold", "spiced nuts"),
    ("Draskov", "Irongate", "Draskan", "black", "onion bread"),
    ("Menthara", "Greenfall", "Mentharan", "teal", "mint candy"),
)

_ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """Spell 0..999 in English ("twenty-one", "one hundred and five"); tests use it to check sums."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    head = _ONES[hundreds] + " hundred"
    return head + (" and " + number_to_words(rest) if rest else "")


# --------------------------------------------------------------------------------------------------
# Small helpers around the four stable random primitives.
# --------------------------------------------------------------------------------------------------


def _pick(rng: random.Random, items: Sequence[T]) -> T:
    return rng.choice(items)


def _between(rng: random.Random, low: int, high: int) -> int:
    """Inclusive integer range via ``randrange`` (``randint`` is avoided only to keep the API list short)."""
    return rng.randrange(low, high + 1)


def _two_people(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    first = _pick(rng, PEOPLE)
    second = _pick(rng, PEOPLE)
    while second == first:
        second = _pick(rng, PEOPLE)
    return first, second


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _count_noun(n: int, food: tuple[str, str]) -> str:
    return f"{number_to_words(n)} {food[0] if n == 1 else food[1]}"


def _a(phrase: str) -> str:
    """Prefix the right indefinite article ("an old kite", "a red kite")."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _possessive(pronoun: str) -> str:
    return {"she": "her", "he": "his"}[pronoun]


# --------------------------------------------------------------------------------------------------
# Document generators. Each returns one document without trailing newline.
# --------------------------------------------------------------------------------------------------


def _story(rng: random.Random) -> str:
    """A short story whose later sentences refer back to earlier ones (names, the found object)."""
    (name, pron), (friend, _) = _two_people(rng)
    animal = _pick(rng, ANIMALS)
    obj = f"{_pick(rng, ADJECTIVES)} {_pick(rng, OBJECTS)}"
    loc = _pick(rng, LOCATIONS)
    opening = _pick(
        rng,
        (
            f"Once upon a time, {name} lived in {_pick(rng, PLACES)}.",
            f"There was once a child named {name} who lived in {_pick(rng, PLACES)}.",
            f"{name} lived in {_pick(rng, PLACES)} with {_a(animal[0])}.",
        ),
    )
    middle = [
        f"It was a {_pick(rng, WEATHER)} day.",
        f"Every morning, {pron} walked to the {loc}.",
        f"One day, {name} found {_a(obj)} near the {loc}.",
        f"{_cap(pron)} showed the {obj} to {friend}.",
        f'{friend} said, "What {_a(_pick(rng, PRAISE))} {obj.split()[1]}!"',
    ]
    extras = [
        f"{_cap(_a(animal[0]))} came by and said {animal[2]}." if animal[2] != "nothing" else "A spider watched them.",
        f"{name} felt {_pick(rng, FEELINGS)}.",
        f"They carried the {obj} to the {_pick(rng, LOCATIONS)}.",
        f"{friend} liked {_pick(rng, HOBBIES)}, and {name} liked {_pick(rng, HOBBIES)}.",
        f"{_cap(_possessive(pron))} {_pick(rng, ('mother', 'father', 'teacher', 'neighbor'))} smiled.",
    ]
    rng.shuffle(extras)
    ending = _pick(
        rng,
        (
            f"In the end, {name} and {friend} became good friends.",
            f"From that day on, {name} always kept the {obj} safe.",
            f"When the sun went down, {name} went home and slept.",
            "The end.",
        ),
    )
    sentences = [opening, *middle, *extras[: _between(rng, 1, 4)], ending]
    return " ".join(sentences)


def _country_facts(country: tuple[str, str, str, str, str]) -> list[str]:
    name, capital, language, color, food = country
    return [
        f"The capital of {name} is {capital}.",
        f"People in {name} speak {language}.",
        f"The flag of {name} is {color}.",
        f"{name} is famous for its {food}.",
        f"{capital} is the capital of {name}.",
    ]


def _facts(rng: random.Random) -> str:
    """Facts from the fixed invented world, in several surface forms (prose, Q/A, table, animals)."""
    style = rng.randrange(4)
    if style == 0:
        country = _pick(rng, COUNTRIES)
        facts = _country_facts(country)
        rng.shuffle(facts)
        return f"Facts about {country[0]}.\n" + " ".join(facts[: _between(rng, 3, 5)])
    if style == 1:
        lines = []
        for _ in range(_between(rng, 2, 5)):
            name, capital, language, _color, _food = _pick(rng, COUNTRIES)
            if rng.random() < 0.5:
                lines.append(f"Q: What is the capital of {name}?\nA: The capital of {name} is {capital}.")
            else:
                lines.append(f"Q: What language do people in {name} speak?\nA: People in {name} speak {language}.")
        return "\n".join(lines)
    if style == 2:
        rows = list(COUNTRIES)
        rng.shuffle(rows)
        body = "\n".join(f"{c[0]} | {c[1]} | {c[2]}" for c in rows[: _between(rng, 3, 7)])
        return "country | capital | language\n" + body
    lines = []
    animals = list(ANIMALS)
    rng.shuffle(animals)
    for name, plural, sound, legs in animals[: _between(rng, 3, 6)]:
        sound_fact = f"{_cap(_a(name))} says {sound}." if sound != "nothing" else f"{_cap(_a(name))} makes no sound."
        lines.append(f"{sound_fact} {_cap(_a(name))} has {number_to_words(legs)} legs. Most {plural} like to rest.")
    return "Animal facts.\n" + " ".join(lines)


def _word_sum(rng: random.Random) -> str:
    op = rng.randrange(3)
    if op == 0:
        a, b = _between(rng, 0, 20), _between(rng, 0, 20)
        return f"{number_to_words(a)} plus {number_to_words(b)} is {number_to_words(a + b)}."
    if op == 1:
        a = _between(rng, 0, 20)
        b = _between(rng, 0, a)
        return f"{number_to_words(a)} minus {number_to_words(b)} is {number_to_words(a - b)}."
    a, b = _between(rng, 0, 10), _between(rng, 0, 10)
    return f"{number_to_words(a)} times {number_to_words(b)} is {number_to_words(a * b)}."


def _digit_sum(rng: random.Random) -> str:
    op = rng.randrange(3)
    if op == 0:
        a, b = _between(rng, 0, 50), _between(rng, 0, 50)
        return f"{a} + {b} = {a + b}"
    if op == 1:
        a = _between(rng, 0, 50)
        b = _between(rng, 0, a)
        return f"{a} - {b} = {a - b}"
    a, b = _between(rng, 0, 12), _between(rng, 0, 12)
    return f"{a} * {b} = {a * b}"


def _word_problem(rng: random.Random) -> str:
    (name, pron), (friend, _) = _two_people(rng)
    food = _pick(rng, FOODS)
    a = _between(rng, 2, 12)
    if rng.random() < 0.5:
        b = _between(rng, 1, 9)
        return (
            f"{name} has {_count_noun(a, food)}. {_cap(pron)} buys {number_to_words(b)} more. "
            f"Now {name} has {_count_noun(a + b, food)}."
        )
    b = _between(rng, 1, a)
    return (
        f"{name} has {_count_noun(a, food)}. {_cap(pron)} gives {number_to_words(b)} to {friend}. "
        f"Now {name} has {_count_noun(a - b, food)}."
    )


def _arithmetic(rng: random.Random) -> str:
    """Correct arithmetic in words, in digits, or as word problems."""
    style = rng.randrange(3)
    if style == 0:
        return "Math practice.\n" + " ".join(_cap(_word_sum(rng)) for _ in range(_between(rng, 3, 7)))
    if style == 1:
        return "\n".join(_digit_sum(rng) for _ in range(_between(rng, 4, 9)))
    return " ".join(_word_problem(rng) for _ in range(_between(rng, 1, 3)))


def _one_count(rng: random.Random) -> str:
    style = rng.randrange(6)
    if style == 0:
        n = _between(rng, 3, 20)
        return f"Let us count to {number_to_words(n)}: " + ", ".join(number_to_words(i) for i in range(1, n + 1)) + "."
    if style == 1:
        step, start = _between(rng, 2, 10), _between(rng, 0, 10)
        seq = [start + step * i for i in range(_between(rng, 4, 10))]
        return f"Counting by {step} from {start}: " + ", ".join(str(x) for x in seq) + "."
    if style == 2:
        n = _between(rng, 3, 15)
        return f"Count down from {n}: " + ", ".join(str(i) for i in range(n, 0, -1)) + ". Liftoff!"
    if style == 3:
        start = rng.randrange(len(LETTERS) - 5)
        k = _between(rng, 3, 5)
        return f"The letters after {LETTERS[start]} are " + ", ".join(LETTERS[start + 1 : start + 1 + k]) + "."
    if style == 4:
        i = rng.randrange(len(WEEKDAYS))
        return f"After {WEEKDAYS[i]} comes {WEEKDAYS[(i + 1) % len(WEEKDAYS)]}."
    i = rng.randrange(len(MONTHS))
    return f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % len(MONTHS)]}."


def _counting(rng: random.Random) -> str:
    """Sequences (numbers, letters, weekdays, months) whose next element is fully predictable."""
    return "\n".join(_one_count(rng) for _ in range(_between(rng, 2, 4)))


def _dialogue_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        name, capital, *_ = _pick(rng, COUNTRIES)
        return f"What is the capital of {name}?", f"The capital of {name} is {capital}."
    if kind == 1:
        a, b = _between(rng, 0, 30), _between(rng, 0, 30)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 2:
        name, _plural, sound, _legs = _pick(rng, ANIMALS)
        answer = f"{_cap(_a(name))} says {sound}." if sound != "nothing" else f"{_cap(_a(name))} makes no sound."
        return f"What does {_a(name)} say?", answer
    if kind == 3:
        name, _plural, _sound, legs = _pick(rng, ANIMALS)
        return f"How many legs does {_a(name)} have?", f"{_cap(_a(name))} has {number_to_words(legs)} legs."
    if kind == 4:
        n = _between(rng, 3, 10)
        words = ", ".join(number_to_words(i) for i in range(1, n + 1))
        return f"Can you count to {number_to_words(n)}?", f"{_cap(words)}."
    if kind == 5:
        name, _capital, _language, color, _food = _pick(rng, COUNTRIES)
        return f"What color is the flag of {name}?", f"The flag of {name} is {color}."
    color = _pick(rng, COLORS)
    return f"My favorite color is {color}. Is that a good color?", f"Yes, {color} is a lovely color."


def _dialogue(rng: random.Random) -> str:
    """User/Assistant exchanges, so chat-style prompts in the demo look familiar to the model."""
    lines = []
    if rng.random() < 0.5:
        lines += [
            "User: Hello!",
            f"Assistant: {_pick(rng, ('Hello!', 'Hi there!', 'Good day!'))} How can I help you?",
        ]
    for _ in range(_between(rng, 2, 4)):
        question, answer = _dialogue_turn(rng)
        lines += [f"User: {question}", f"Assistant: {answer}"]
    if rng.random() < 0.5:
        lines += ["User: Thank you.", "Assistant: You are welcome. Goodbye!"]
    return "\n".join(lines)


def _lists(rng: random.Random) -> str:
    """Bulleted and numbered lists: teaches line structure and list markers."""
    style = rng.randrange(3)
    if style == 0:
        name, _ = _pick(rng, PEOPLE)
        foods = list(FOODS)
        rng.shuffle(foods)
        items = [f"- {_count_noun(_between(rng, 1, 9), f)}" for f in foods[: _between(rng, 2, 6)]]
        return f"Shopping list for {name}:\n" + "\n".join(items)
    if style == 1:
        room = _pick(rng, ROOMS)
        things = list(ROOM_THINGS)
        rng.shuffle(things)
        items = [f"{i}. {thing}" for i, thing in enumerate(things[: _between(rng, 3, 6)], start=1)]
        return f"Things in the {room}:\n" + "\n".join(items)
    name, pron = _pick(rng, PEOPLE)
    hobbies = list(HOBBIES)
    rng.shuffle(hobbies)
    items = [f"- {h}" for h in hobbies[: _between(rng, 2, 4)]]
    return f"{name} has many hobbies. {_cap(pron)} likes:\n" + "\n".join(items)


def _code_snippet(rng: random.Random) -> str:
    style = rng.randrange(5)
    a, b = _between(rng, 1, 20), _between(rng, 1, 20)
    if style == 0:
        fn, sym = _pick(rng, (("add", "+"), ("mul", "*")))
        calls = [(_between(rng, 0, 20), _between(rng, 0, 20)) for _ in range(_between(rng, 1, 3))]
        prints = "\n".join(f"print({fn}({x}, {y}))  # {x + y if sym == '+' else x * y}" for x, y in calls)
        return f"def {fn}(a, b):\n    return a {sym} b\n{prints}"
    if style == 1:
        return f"x = {a}\ny = {b}\nprint(x + y)  # {a + b}\nprint(x * y)  # {a * b}"
    if style == 2:
        n = _between(rng, 2, 6)
        return f"for i in range({n}):\n    print(i)\n# prints " + ", ".join(str(i) for i in range(n))
    if style == 3:
        nums = [_between(rng, 0, 30) for _ in range(_between(rng, 3, 6))]
        return f"numbers = {nums}\nprint(sorted(numbers))  # {sorted(nums)}\nprint(sum(numbers))  # {sum(nums)}"
    name, _ = _pick(rng, PEOPLE)
    return f'name = "{name}"\nprint("Hello, " + name + "!")  # Hello, {name}!'


def _code(rng: random.Random) -> str:
    """Tiny Python-like programs whose commented output is correct (no blank lines: those separate docs)."""
    return "\n".join(_code_snippet(rng) for _ in range(_between(rng, 2, 3)))


_GENERATORS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_story, 0.25),
    (_facts, 0.13),
    (_arithmetic, 0.17),
    (_counting, 0.08),
    (_dialogue, 0.17),
    (_lists, 0.08),
    (_code, 0.12),
)


def _document(rng: random.Random) -> str:
    """Pick a document type by weight with ``random()``; ``choices`` is avoided to keep to the stable four."""
    x = rng.random() * sum(w for _, w in _GENERATORS)
    for generate, weight in _GENERATORS:
        if x < weight:
            return generate(rng)
        x -= weight
    return _GENERATORS[-1][0](rng)


def embedded_corpus(split: str = "train", num_chars: int | None = None) -> str:
    """Return the embedded corpus for ``split`` ("train", "eval" or "valid").

    Whole documents are appended (separated by a blank line, ending in a newline) while the text stays
    within ``num_chars``; the result is therefore a little shorter than requested, never longer, and a
    shorter request is always a prefix of a longer one for the same split. Only when even the first
    document does not fit is it cut to exactly ``num_chars``.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown corpus split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    limit = DEFAULT_NUM_CHARS[split] if num_chars is None else num_chars
    if limit < 0:
        raise ValueError(f"num_chars must be >= 0, got {limit}")
    if limit == 0:
        return ""
    rng = random.Random(SPLIT_SEEDS[split])
    docs: list[str] = []
    total = 1  # the final newline
    while True:
        doc = _document(rng)
        cost = len(doc) + (2 if docs else 0)
        if total + cost > limit:
            break
        docs.append(doc)
        total += cost
    if not docs:
        return (doc + "\n")[:limit]
    return "\n\n".join(docs) + "\n"


def write_embedded_corpus(out_dir: str | Path) -> dict[str, Path]:
    """Write ``train.txt``, ``eval.txt`` and ``valid.txt`` (default sizes) into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in SPLIT_SEEDS:
        path = out / f"{split}.txt"
        write_text_atomic(path, embedded_corpus(split))
        paths[split] = path
    return paths
