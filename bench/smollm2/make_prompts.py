"""Chat prompts for SmolLM2-135M-Instruct's Medusa heads, made here (no downloads).

Training prompts come from task templates x topics; the held-out prompts come from templates
AND topics that the training prompts never use (so held-out acceptance is not memorised text).
Each JSONL line: {"id", "family", "messages": [{"role": "user", "content": ...}]}, plus
"input_ids" (the chat template rendered with add_generation_prompt=True) when --model is given.

    python bench/smollm2/make_prompts.py --model /work/data/smollm2-hf --ids-out /work/data
"""

from __future__ import annotations

import argparse
import json
import os
import random


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(";")]


TOPICS = _split("""
photosynthesis; black holes; the water cycle; volcanoes; earthquakes; climate change;
the immune system; vaccines; DNA; evolution; gravity; electricity; magnetism; the solar system;
the moon; rainbows; ocean tides; coral reefs; rainforests; deserts; glaciers; bees; ants;
dolphins; elephants; octopuses; birds migration; dinosaurs; fossils; the Roman Empire;
ancient Egypt; the printing press; the Industrial Revolution; the Renaissance; the Silk Road;
the Great Wall of China; the Olympic Games; democracy; taxes; inflation; the stock market;
banks; cryptocurrency; supply and demand; small businesses; remote work; email etiquette;
public libraries; museums; recycling; composting; solar power; wind turbines; electric cars;
bicycles; trains; airplanes; the internet; smartphones; social media; video games;
artificial intelligence; robots; 3D printing; cloud computing; passwords; data privacy;
coffee; tea; chocolate; bread baking; pizza; rice; vegetables; breakfast; vegetarian diets;
sleep; exercise; yoga; running; swimming; football; basketball; chess; music theory; jazz;
classical music; painting; photography; poetry; libraries; reading habits; learning a language;
public speaking; time management; friendship; teamwork; gardening; houseplants; cats; dogs;
pet adoption; camping; hiking; mountains; rivers; islands; lighthouses; castles; bridges;
skyscrapers; cities; villages; traffic; recycling plastic; fast fashion; minimalism; budgeting;
saving money; job interviews; resumes; volunteering; kindness; curiosity; the scientific method;
microscopes; telescopes; satellites; the Mars rovers; the speed of light; sound waves; clouds;
snow; thunderstorms; hurricanes; the seasons; calendars; clocks; maps; compasses; vitamins;
the heart; the brain; memory; dreams; laughter; honey; salt; sugar; spices; cheese; mushrooms""")

HELD_TOPICS = _split("""
quantum computing; origami; beekeeping; the Eiffel Tower; submarines; penguins;
sourdough starters; knitting; the Amazon river; meteor showers; tattoos; the violin; board games;
the Vikings; wolves; sunflowers; hot air balloons; podcasts; carpentry; the Sahara;
typography; comets; jellyfish; maple syrup; skateboarding; the piano; libraries of the future;
sign language; origami cranes; ice cream; bamboo; the postal service; tornadoes; marathons;
pyramids of Mexico; owls; lighthouses keepers; vinyl records; sand dunes; cactus plants""")

TEMPLATES = [
    "Explain {t} in simple terms.", "What is {t}?", "Give me three facts about {t}.",
    "List five interesting things about {t}.", "Write a short poem about {t}.",
    "Write a short story that involves {t}.", "Why is {t} important?",
    "Summarize the history of {t} in a few sentences.", "What are the pros and cons of {t}?",
    "Explain {t} to a ten-year-old.", "Write a haiku about {t}.", "Give me a fun fact about {t}.",
    "What are common misconceptions about {t}?", "How does {t} affect everyday life?",
    "Write a tweet about {t}.", "Describe {t} in one paragraph.",
    "What should a beginner know about {t}?", "Write a short email to a friend about {t}.",
    "Compare {t} and {u}.", "What is the difference between {t} and {u}?", "Define {t}.",
    "Write a limerick about {t}.", "Create a quiz question about {t} and give the answer.",
    "Suggest five titles for a blog post about {t}.", "How can I learn more about {t}?",
    "What are the main parts of {t}?", "Tell me something surprising about {t}.",
    "Write a short speech about {t}.", "What are three questions a student might ask about {t}?",
    "Can you give me an overview of {t}?", "How are {t} and {u} related?",
    "Write a paragraph for a school report on {t}.",
]
HELD_TEMPLATES = [
    "Write a product description inspired by {t}.", "Tell me a joke about {t}.",
    "What would happen if {t} disappeared tomorrow?",
    "Write a dialogue between two friends discussing {t}.",
    "Give an analogy that explains {t}.", "In two sentences, what is the future of {t}?",
    "Write a motivational message that mentions {t}.",
    "What questions would a journalist ask about {t}?",
]

TASKS = _split("""
make a cup of tea; boil an egg; change a flat tire; plant a tree; write a resume;
prepare for a job interview; start running; learn to swim; clean a laptop keyboard;
organize my desk; save money each month; make a budget; start a vegetable garden;
train a puppy; bake bread; cook rice; make pancakes; fold a shirt; wash a wool sweater;
remove a coffee stain; study for an exam; take better notes; improve my handwriting;
fall asleep faster; wake up early; stay focused while working; write a thank-you note;
give a good presentation; learn to play guitar; start a blog; back up my phone;
create a strong password; set up a home network; paint a room; hang a picture; fix a leaky faucet;
pack for a trip; plan a birthday party; make new friends in a new city; reduce food waste;
meditate; start journaling; read more books; learn a new language; keep houseplants alive;
make a paper airplane; sharpen a knife; ride a bicycle safely""")
HELD_TASKS = _split("""
brew cold brew coffee; tune a ukulele; frame a painting; clean a cast iron pan;
memorize a poem; negotiate a salary; knit a scarf; care for a bonsai tree; build a birdhouse;
write a wedding toast""")
TASK_TEMPLATES = ["How do I {k}?", "What are the steps to {k}?", "Give me a checklist to {k}.",
                  "What is the easiest way to {k}?", "Can you teach me how to {k}?",
                  "Give me tips to {k}."]
HELD_TASK_TEMPLATES = ["I want to {k}. Where should I start?",
                       "What mistakes should people avoid when they {k}?"]

FEELINGS = _split("""
stressed about exams; nervous before a presentation; lonely after moving; bored at
work; tired all the time; unmotivated to exercise; overwhelmed by chores; worried about money;
anxious about a new job; sad after a breakup; distracted by my phone; stuck on a project""")
ADVICE_TEMPLATES = ["I feel {f}. What should I do?", "Any advice? I am {f}.",
                    "My friend is {f}. How can I help?"]
HELD_FEELINGS = _split("""
jealous of a coworker; homesick while studying abroad; afraid of flying;
frustrated with my roommate""")
HELD_ADVICE_TEMPLATES = ["Lately I have been {f}. Is that normal, and what helps?"]

PEOPLE = _split("""
my manager; a teacher; my landlord; a customer; my neighbor; a colleague;
my professor; a hotel; a restaurant; my team""")
PURPOSES = _split("""
asking for a day off; thanking them for their help; apologizing for being late;
asking for a meeting next week; complaining about a noise problem; requesting a refund;
inviting them to a party; announcing a project delay; asking for feedback;
confirming a reservation""")
EMAIL_TEMPLATES = ["Write a short email to {p} {q}.", "Draft a polite message to {p} {q}."]
HELD_PEOPLE = ["my dentist", "a car rental company", "my coach"]
HELD_PURPOSES = ["rescheduling an appointment", "asking about a lost item"]
HELD_EMAIL_TEMPLATES = ["Compose a brief, friendly text message to {p} {q}."]

CHARACTERS = _split("""
a brave mouse; a lonely robot; a curious girl; an old fisherman; a talking cat;
a young wizard; a lost astronaut; a clever fox; a shy dragon; a busy baker; a retired pirate;
a kind giant""")
EVENTS = _split("""
finds a hidden door; learns to fly; makes a new friend; gets lost in a storm;
discovers a secret map; wins a contest; loses something precious; travels back in time;
opens a small shop; saves a village""")
STORY_TEMPLATES = ["Write a short story about {c} who {e}.",
                   "Tell me a bedtime story about {c} who {e}.",
                   "Write a poem about {c} who {e}."]
HELD_CHARACTERS = ["a nervous snowman", "a grumpy lighthouse", "a singing turtle"]
HELD_EVENTS = ["forgets how to sleep", "becomes a detective"]
HELD_STORY_TEMPLATES = ["Write the opening paragraph of a novel about {c} who {e}."]

FUNCS = _split("""
reverses a string; checks whether a number is prime; returns the largest item in a
list; counts the vowels in a word; computes the factorial of n; merges two sorted lists;
removes duplicates from a list; checks whether a word is a palindrome; converts Celsius to
Fahrenheit; sums the digits of a number; finds the second largest number in a list;
returns the n-th Fibonacci number; counts words in a sentence; sorts a list of names;
flattens a nested list; checks if two strings are anagrams; computes the average of a list;
capitalizes every word in a sentence; finds common elements of two lists; reads a file and
counts its lines""")
HELD_FUNCS = _split("""
rotates a list by k positions; validates an email address;
computes the greatest common divisor of two numbers; groups words by their first letter""")
LANGS = ["Python", "JavaScript", "Java", "C", "Rust", "Go"]
HELD_LANGS = ["Ruby", "Kotlin"]
CONCEPTS = _split("""
a variable; a loop; a function; recursion; a class; an array; a dictionary;
a pointer; an API; a database index; version control; unit testing; a compiler;
an exception; a hash table; a linked list; big O notation; a stack; a queue;
object-oriented programming""")
HELD_CONCEPTS = ["a closure", "a race condition", "memoization", "a binary heap"]
CODE_TEMPLATES = ["Write a {l} function that {f}.", "How do I write code in {l} that {f}?"]
CONCEPT_TEMPLATES = ["Explain what {x} is in programming.", "What is {x}? Give an example.",
                     "Why do programmers use {x}?"]
HELD_CODE_TEMPLATES = ["Show me a short {l} snippet that {f}, with comments."]
HELD_CONCEPT_TEMPLATES = ["Describe {x} as if you were teaching a new programmer."]


def math_problem(rng: random.Random, held: bool) -> str:
    a, b, c = rng.randint(2, 19), rng.randint(2, 12), rng.randint(20, 99)
    train = [
        f"A store sells apples for ${a} each. How much do {b} apples cost?",
        f"Tom has {c} marbles and gives away {a}. How many marbles does he have left?",
        f"A train travels {c} kilometers per hour. How far does it go in {b} hours?",
        f"There are {b} boxes with {a} pencils in each. How many pencils are there in total?",
        f"What is {c} plus {a} times {b}?",
        f"Sara reads {a} pages a day. How many days does she need to read {a * b} pages?",
        f"A rectangle is {a} cm wide and {b} cm long. What is its area?",
        f"If a shirt costs ${c} and is on sale for {b * 5}% off, what is the sale price?",
        f"What is {a * b} divided by {b}?",
        f"A class has {c} students and {a} of them are absent. How many are present?",
        f"Solve for x: {a}x + {b} = {a * 3 + b}.",
        f"What is the perimeter of a square with sides of {a} meters?",
    ]
    heldout = [
        f"A baker makes {c} cookies and packs them in bags of {b}. How many full bags are "
        f"there, and how many cookies are left over?",
        f"A tank holds {c * 10} liters and drains {a} liters per minute. How long until it "
        f"is empty?",
        f"If I save ${a} every week, how many weeks until I have ${a * c}?",
    ]
    return rng.choice(heldout if held else train)


def build(held: bool, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    clean = [s.strip() for s in (HELD_TOPICS if held else TOPICS)]
    pick = [s.strip() for s in (HELD_TASKS if held else TASKS)]
    H = held
    fams = {
        "general": (8, lambda: rng.choice(HELD_TEMPLATES if H else TEMPLATES).format(
            t=rng.choice(clean), u=rng.choice(clean))),
        "howto": (2, lambda: rng.choice(HELD_TASK_TEMPLATES if H else TASK_TEMPLATES).format(
            k=rng.choice(pick))),
        "advice": (1, lambda: rng.choice(HELD_ADVICE_TEMPLATES if H else ADVICE_TEMPLATES)
                   .format(f=rng.choice([s.strip() for s in (HELD_FEELINGS if H else FEELINGS)]))),
        "email": (1, lambda: rng.choice(HELD_EMAIL_TEMPLATES if H else EMAIL_TEMPLATES).format(
            p=rng.choice([s.strip() for s in (HELD_PEOPLE if H else PEOPLE)]),
            q=rng.choice([s.strip() for s in (HELD_PURPOSES if H else PURPOSES)]))),
        "story": (1, lambda: rng.choice(HELD_STORY_TEMPLATES if H else STORY_TEMPLATES).format(
            c=rng.choice([s.strip() for s in (HELD_CHARACTERS if H else CHARACTERS)]),
            e=rng.choice([s.strip() for s in (HELD_EVENTS if H else EVENTS)]))),
        "math": (2, lambda: math_problem(rng, H)),
        "code": (1, lambda: rng.choice(HELD_CODE_TEMPLATES if H else CODE_TEMPLATES).format(
            l=rng.choice(HELD_LANGS if H else LANGS),
            f=rng.choice([s.strip() for s in (HELD_FUNCS if H else FUNCS)]))),
        "concept": (1, lambda: rng.choice(HELD_CONCEPT_TEMPLATES if H else CONCEPT_TEMPLATES)
                    .format(x=rng.choice([s.strip() for s in (HELD_CONCEPTS if H else CONCEPTS)]))),
    }
    names = list(fams)
    weights = [fams[k][0] for k in names]
    seen: set[str] = set()
    out = []
    while len(out) < n:
        fam = rng.choices(names, weights)[0]
        text = fams[fam][1]()
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": len(out), "family": fam,
                    "messages": [{"role": "user", "content": text}]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--model", default=None, help="HF dir with the chat template (for input_ids)")
    p.add_argument("--ids-out", default=None,
                   help="with --model: also write the files with input_ids here")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=96)
    a = p.parse_args()
    tok = None
    if a.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
    train = build(False, a.train, seed=1)
    held = build(True, a.heldout, seed=2)
    leak = {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"]
                                                           for r in held}
    assert not leak, leak
    for name, rows in (("prompts_train.jsonl", train), ("prompts_heldout.jsonl", held)):
        with open(os.path.join(a.out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if tok is not None and a.ids_out:
            with open(os.path.join(a.ids_out, name), "w") as f:
                for r in rows:
                    text = tok.apply_chat_template(r["messages"], add_generation_prompt=True,
                                                   tokenize=False)
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    f.write(json.dumps(dict(r, input_ids=ids)) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
