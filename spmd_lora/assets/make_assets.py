"""Regenerate the bundled sample data: ``python -m spmd_lora.assets.make_assets``.

Everything here is original text produced from small hand-written templates and a fixed seed,
so the output is deterministic and free of third-party content:

* ``corpus.txt``         English prose (science, history, cooking, geography, ...) that the
                         tiny sentencepiece tokenizer is trained on (see ``spmd_lora.tiny``).
* ``alpaca_sample.jsonl`` 64 instruction / input / output rows (about half with an input).
* ``rag_sample.jsonl``    32 question / contexts / answer rows about invented towns; contexts
                         are plain strings or ``{"title", "text"}`` objects.
* ``text_sample.jsonl``   32 ``{"text": ...}`` paragraphs.
* ``rag_passages.jsonl``  a passage collection for ``spmd-lora rag-data``: 40 invented towns
                         and 20 prose notes, ``{"id", "title", "text"}``.
* ``rag_qa.jsonl``        80 question / answer rows about those towns, ``oracle`` = the id of
                         the town's passage.
* ``dpo_sample.jsonl``    32 preference rows ``{"prompt", "chosen", "rejected"}`` from the
                         Alpaca rows: the instruction (and input) as the prompt, the row's own
                         output chosen, another row's output rejected (``train --objective
                         dpo``).

The files are committed; this script only documents (and can reproduce) how they were made.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Prose corpus
# --------------------------------------------------------------------------------------------

SCIENCE = dict(
    subjects=["Water", "Light", "Sound", "Heat", "A magnet", "An electric current", "Gravity",
              "A falling stone", "A green leaf", "The human heart", "A healthy cell", "Iron",
              "Warm air", "Cold water", "A glass prism", "The moon", "A distant star",
              "A copper wire", "A spinning wheel", "Salt water", "A seed", "The ocean tide",
              "A small bacterium", "A loud drum", "Sunlight"],
    verbs=["moves faster when", "changes its shape when", "grows slowly when", "loses energy when",
           "becomes easier to measure when", "behaves differently when", "heats up quickly when",
           "slows down when", "bends sharply when", "can be observed clearly when"],
    conditions=["the temperature rises", "it passes through glass", "the pressure drops",
                "the room is dark", "it is placed near a magnet", "the air is dry",
                "it is left alone for a week", "a careful student repeats the test",
                "the surface is smooth", "there is more salt in the water",
                "the experiment is done at night", "the wire is made longer"],
    facts=["Scientists test an idea by changing one thing at a time and watching the result.",
           "A good measurement is written down together with its unit and its uncertainty.",
           "Plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
           "Sound needs a medium such as air or water; it cannot travel through empty space.",
           "Light from the sun takes a little more than eight minutes to reach the earth.",
           "Every atom has a small heavy nucleus surrounded by much lighter electrons.",
           "The boiling point of water falls as you climb higher up a mountain.",
           "A lens bends light so that rays from one point meet again at another point.",
           "Energy is never created or destroyed; it only changes from one form to another.",
           "The heart pumps blood through a closed loop of arteries, capillaries and veins.",
           "Ice floats because water expands when it freezes.",
           "An experiment that cannot be repeated by others is not yet good evidence.",
           "Friction turns some of the energy of motion into heat.",
           "Muscles can only pull, so they work in pairs to move a joint back and forth.",
           "A thermometer works because most liquids expand a little when they warm up."],
    closers=["This is why careful notes matter.", "The result surprised many early observers.",
             "Simple tools are often enough to see it.", "It is easy to try at home.",
             "Teachers like to show it in class.", "The effect is small but real.",
             "Later work explained the reason in detail.", "Nobody fully understood it at first."],
)

HISTORY = dict(
    places=["the river valley", "the old harbour town", "the northern kingdom", "the mountain pass",
            "the desert trade route", "the island colony", "the walled city", "the coastal plain",
            "the forest villages", "the market square", "the great library", "the border fort"],
    groups=["farmers", "merchants", "monks", "sailors", "weavers", "soldiers", "scribes",
            "builders", "travelling musicians", "fishermen", "young apprentices", "potters"],
    actions=["built a stone bridge", "opened a new school", "signed a long peace treaty",
             "began to keep written records", "dug a canal for their fields",
             "traded wool for salt and spices", "rebuilt the walls after a flood",
             "held a fair every spring", "copied old books by hand", "mapped the coastline",
             "planted orchards on the hills", "elected a council of elders"],
    times=["In the early years", "During a long winter", "After the great fire",
           "Around the turn of the century", "Many generations ago", "In a time of plenty",
           "During the years of drought", "Shortly after the war", "In the age of sail",
           "Before the roads were paved"],
    results=["and the town grew richer", "and travellers began to visit",
             "and their customs spread along the coast", "and the population slowly doubled",
             "and the old quarrels were forgotten", "and the records survive to this day",
             "and many families moved there", "but the work took almost twenty years",
             "but the plan was soon abandoned", "and historians still argue about why"],
    facts=["Historians compare several sources before they trust a single account.",
           "Old letters and account books often tell us more than official chronicles.",
           "Coins found in the ground can show which places traded with each other.",
           "Many ancient cities were built beside rivers that gave water and a road for boats.",
           "The printing press made books cheaper and helped new ideas spread quickly.",
           "Maps drawn centuries ago show what people believed as well as what they saw.",
           "Archaeologists date layers of soil by the objects and seeds they contain.",
           "A calendar lets a community plan planting, markets and festivals together."],
)

COOKING = dict(
    dishes=["a simple tomato soup", "fresh bread", "a pot of rice", "a vegetable stew",
            "a lemon cake", "roasted potatoes", "a bean salad", "pancakes", "a mushroom pie",
            "flat bread", "a pumpkin curry", "an apple crumble", "a pot of lentils",
            "baked fish with herbs", "a bowl of noodles"],
    steps=["chop the onions finely", "warm a little oil in a heavy pan",
           "stir the mixture gently", "add a pinch of salt", "let the dough rest for an hour",
           "taste the sauce before serving", "wash the rice until the water runs clear",
           "preheat the oven", "slice the vegetables into even pieces",
           "cover the pot and lower the heat", "whisk the eggs with the milk",
           "toast the spices for a minute", "grate the zest of one lemon",
           "soak the beans overnight", "brush the top with melted butter"],
    tips=["Even pieces cook at the same speed.", "A sharp knife is safer than a blunt one.",
          "Salt brings out the flavour of most vegetables.",
          "Resting the dough makes it easier to shape.",
          "Fresh herbs are best added at the very end.",
          "A lid keeps the heat and the moisture in the pot.",
          "Cold butter gives pastry a light and flaky texture.",
          "Acid such as lemon juice brightens a heavy dish.",
          "Reading the whole recipe first avoids surprises later.",
          "Slow cooking turns tough vegetables sweet and soft."],
    times=["ten minutes", "twenty minutes", "half an hour", "forty minutes", "an hour",
           "two hours", "five minutes", "a quarter of an hour"],
)

GEOGRAPHY = dict(
    features=["a wide river", "a chain of low hills", "a deep blue lake", "a sandy bay",
              "a dense pine forest", "a dry plateau", "a narrow valley", "a rocky cape",
              "a salt marsh", "a long glacier", "a volcanic island", "a grassy plain"],
    climates=["mild and wet", "hot and dry", "cold for most of the year", "windy in autumn",
              "warm with sudden storms", "cool and foggy", "snowy in winter and pleasant in summer"],
    activities=["fishing", "sheep farming", "growing grapes", "mining copper", "making cheese",
                "building boats", "weaving baskets", "keeping bees", "cutting timber",
                "growing tea", "guiding hikers", "collecting salt"],
)

DAILY = [
    "Mara opened the window and listened to the birds in the garden.",
    "The train was late, so Theo read a chapter of his book on the platform.",
    "Every Sunday the neighbours share vegetables from their small gardens.",
    "A good friend listens more than they speak.",
    "The children counted the stars until they fell asleep.",
    "Writing a short list each morning helps to finish the most important tasks.",
    "The old clock in the hall chimes twelve times at noon.",
    "When it rains, the path to the river becomes muddy and slippery.",
    "The library is quiet in the morning and busy after school.",
    "He repaired the bicycle with a spanner, some oil and a great deal of patience.",
    "The market sells bread, cheese, honey and fresh flowers.",
    "Learning a new language takes practice every day, even for a few minutes.",
    "The cat slept on the warm stone wall all afternoon.",
    "They walked along the beach and collected smooth grey pebbles.",
    "A map, a torch and a bottle of water are useful on any long walk.",
    "The teacher asked the class to explain their answers in their own words.",
    "Numbers like 3, 14, 256 and 1024 appear often in computing.",
    "The meeting starts at 9:30 and should finish before 11:00.",
    "She planted 12 rows of beans and 4 rows of carrots.",
    "The recipe serves 6 people and takes about 45 minutes.",
]

COMPUTING = [
    "A computer program is a list of precise instructions that a machine follows in order.",
    "A function takes some inputs, does a calculation, and returns a result.",
    "Testing a program with small examples catches many mistakes early.",
    "A model learns patterns from examples by adjusting many numbers a little at a time.",
    "Training a language model means teaching it to predict the next word in a text.",
    "A tokenizer splits text into small pieces and gives each piece a number.",
    "Large matrices can be split across several devices so that each device does part of the work.",
    "Low rank adapters add a small number of trainable weights to a frozen model.",
    "The learning rate controls how large each update step is.",
    "Saving checkpoints lets a long training run continue after an interruption.",
    "A batch is a group of examples processed together in one step.",
    "Attention lets each word in a sentence look at the words that came before it.",
    "Memory is often the limit when a model reads very long documents.",
    "A question answering system reads a few passages and writes a short answer.",
]


def _science(r: random.Random) -> str:
    s = SCIENCE
    sents = []
    for _ in range(r.randint(2, 4)):
        sents.append(f"{r.choice(s['subjects'])} {r.choice(s['verbs'])} {r.choice(s['conditions'])}.")
    sents.insert(r.randint(0, len(sents)), r.choice(s["facts"]))
    sents.append(r.choice(s["closers"]))
    return " ".join(sents)


def _history(r: random.Random) -> str:
    h = HISTORY
    sents = []
    for _ in range(r.randint(2, 4)):
        sents.append(f"{r.choice(h['times'])}, the {r.choice(h['groups'])} of {r.choice(h['places'])} "
                     f"{r.choice(h['actions'])}, {r.choice(h['results'])}.")
    sents.insert(r.randint(0, len(sents)), r.choice(h["facts"]))
    return " ".join(sents)


def _cooking(r: random.Random) -> str:
    c = COOKING
    dish = r.choice(c["dishes"])
    steps = r.sample(c["steps"], r.randint(3, 5))
    text = f"To make {dish}, first {steps[0]}. "
    for st in steps[1:-1]:
        text += f"{r.choice(['Then', 'Next', 'After that', 'Now'])} {st}. "
    text += f"Finally {steps[-1]} and cook for about {r.choice(c['times'])}. "
    text += r.choice(c["tips"])
    return text


def _geography(r: random.Random) -> str:
    g = GEOGRAPHY
    name = _town_name(r)
    f1, f2 = r.sample(g["features"], 2)
    a1, a2 = r.sample(g["activities"], 2)
    return (f"The region around {name} has {f1} to the north and {f2} to the south. "
            f"The climate is {r.choice(g['climates'])}, and most people earn a living from "
            f"{a1} or {a2}. About {r.randint(2, 90) * 100} people live there, and the nearest "
            f"city is {r.randint(5, 120)} kilometres away.")


def _daily(r: random.Random) -> str:
    return " ".join(r.sample(DAILY, 3) + r.sample(COMPUTING, 1))


SYLL_A = ["Bel", "Cor", "Dun", "Elm", "Fen", "Gal", "Har", "Ist", "Kel", "Lor", "Mar", "Nor",
          "Ost", "Pel", "Ros", "Sil", "Tor", "Val", "Wen", "Yar"]
SYLL_B = ["ford", "mere", "holt", "wick", "stead", "haven", "brook", "field", "gate", "moor",
          "ton", "ridge", "by", "wood", "port", "dale"]


def _town_name(r: random.Random) -> str:
    return r.choice(SYLL_A) + r.choice(SYLL_B)


def make_corpus(n_paragraphs: int = 700, seed: int = 0) -> str:
    r = random.Random(seed)
    makers = [_science, _history, _cooking, _geography, _daily]
    paras = [makers[i % len(makers)](r) for i in range(n_paragraphs)]
    r.shuffle(paras)
    # Fixed sentences once each, so every word of the banks is in the corpus.
    paras += SCIENCE["facts"] + HISTORY["facts"] + COOKING["tips"] + DAILY + COMPUTING
    return "\n".join(paras) + "\n"


# --------------------------------------------------------------------------------------------
# Alpaca sample
# --------------------------------------------------------------------------------------------

ALPACA_FIXED = [
    ("Name the process by which plants make sugar from sunlight.", "", "Photosynthesis."),
    ("Give one reason why ice floats on water.", "",
     "Water expands when it freezes, so ice is less dense than liquid water."),
    ("Explain in one sentence what a thermometer measures.", "",
     "A thermometer measures temperature."),
    ("Suggest a simple breakfast that needs no cooking.", "",
     "A bowl of yoghurt with fresh fruit and a handful of oats."),
    ("What should you do before starting a new recipe?", "",
     "Read the whole recipe first and gather the ingredients."),
    ("List three things to bring on a long walk.", "", "A map, a torch and a bottle of water."),
    ("Why do historians compare several sources?", "",
     "Because a single account can be mistaken or biased."),
    ("Describe what a tokenizer does.", "",
     "It splits text into small pieces and gives each piece a number."),
    ("What does the learning rate control?", "", "How large each update step is."),
    ("Give a short tip for cooking vegetables evenly.", "", "Cut them into pieces of the same size."),
    ("Write a short greeting for a new neighbour.", "",
     "Welcome to the street! Let us know if you need anything."),
    ("What is a checkpoint used for in training?", "",
     "It saves progress so a run can continue after an interruption."),
    ("Name the organ that pumps blood around the body.", "", "The heart."),
    ("How long does sunlight take to reach the earth?", "", "A little more than eight minutes."),
    ("Suggest a name for a friendly cat.", "", "Pebble."),
    ("Why does the boiling point of water fall on a mountain?", "",
     "Because the air pressure is lower higher up."),
    ("Summarize the text in one sentence.",
     "The market opens at dawn. Farmers bring bread, cheese and honey. By noon most stalls are empty.",
     "Farmers sell their food at the market in the morning."),
    ("Classify the sentiment of the review as positive or negative.",
     "The soup was cold and the bread was stale.", "Negative."),
    ("Classify the sentiment of the review as positive or negative.",
     "A warm, friendly cafe with the best lemon cake in town.", "Positive."),
    ("Rewrite the sentence in the past tense.", "The children count the stars.",
     "The children counted the stars."),
    ("Rewrite the sentence in the past tense.", "She plants beans in the garden.",
     "She planted beans in the garden."),
    ("Translate the word into French.", "bread", "pain"),
    ("Translate the word into French.", "water", "eau"),
    ("Extract the time from the sentence.", "The meeting starts at 9:30 in the small hall.", "9:30"),
    ("Give the main ingredient of the dish.", "a pumpkin curry", "Pumpkin."),
    ("Correct the spelling mistake.", "The librery is quiet in the morning.",
     "The library is quiet in the morning."),
]


def make_alpaca(seed: int = 1) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for ins, inp, out in ALPACA_FIXED:
        rows.append({"instruction": ins, "input": inp, "output": out})
    words = ["river", "bread", "candle", "garden", "window", "market", "pebble", "lantern",
             "harbour", "meadow", "kettle", "compass"]
    # Small learnable tasks with an input field.
    for _ in range(8):
        a, b = r.randint(2, 60), r.randint(2, 40)
        rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}",
                     "output": str(a + b)})
    for _ in range(6):
        w = r.choice(words)
        rows.append({"instruction": "Write the word in capital letters.", "input": w,
                     "output": w.upper()})
    for _ in range(6):
        w = r.choice(words)
        rows.append({"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]})
    for _ in range(6):
        nums = r.sample(range(1, 50), 4)
        rows.append({"instruction": "Sort the numbers from smallest to largest.",
                     "input": ", ".join(map(str, nums)),
                     "output": ", ".join(map(str, sorted(nums)))})
    # Without an input field at all (the key is absent), like many Alpaca-style files.
    for _ in range(6):
        n = r.randint(2, 9)
        rows.append({"instruction": f"What is {n} times {n + 1}?", "output": str(n * (n + 1))})
    for _ in range(6):
        d = r.choice(COOKING["dishes"])
        rows.append({"instruction": f"Give one tip for making {d}.",
                     "output": r.choice(COOKING["tips"])})
    r.shuffle(rows)
    return rows


# --------------------------------------------------------------------------------------------
# RAG sample (invented towns, answers are spans of a gold passage)
# --------------------------------------------------------------------------------------------

def _town_fact(r: random.Random, used: set) -> dict:
    while True:
        name = _town_name(r)
        if name not in used:
            used.add(name)
            break
    return dict(name=name, river=_town_name(r).replace("ford", "") + " River",
                founded=r.randint(1102, 1890), population=r.randint(12, 980) * 100,
                activity=r.choice(GEOGRAPHY["activities"]),
                feature=r.choice(GEOGRAPHY["features"]),
                climate=r.choice(GEOGRAPHY["climates"]),
                festival=r.choice(["lantern", "harvest", "boat", "bread", "music", "kite"]))


def _town_passage(t: dict) -> str:
    return (f"{t['name']} is a small town on the banks of the {t['river']}. It was founded in "
            f"{t['founded']} and today has about {t['population']} inhabitants. The local economy "
            f"depends mostly on {t['activity']}, and the town is known for its {t['festival']} "
            f"festival every summer. Visitors often walk to {t['feature']} just outside the town. "
            f"The climate is {t['climate']}.")


QUESTIONS = [
    ("In which year was {name} founded?", lambda t: str(t["founded"])),
    ("On which river does {name} lie?", lambda t: f"The {t['river']}."),
    ("About how many people live in {name}?", lambda t: f"About {t['population']}."),
    ("What does the economy of {name} mostly depend on?", lambda t: t["activity"].capitalize() + "."),
    ("Which festival is {name} known for?", lambda t: f"Its {t['festival']} festival."),
    ("What is the climate of {name} like?", lambda t: t["climate"].capitalize() + "."),
]


def make_rag(n: int = 32, seed: int = 2) -> list[dict]:
    r = random.Random(seed)
    used: set = set()
    towns = [_town_fact(r, used) for _ in range(n + 8)]
    rows = []
    for i in range(n):
        gold = towns[i]
        q, a = QUESTIONS[i % len(QUESTIONS)]
        others = r.sample([t for t in towns if t is not gold], r.randint(1, 3))
        passages = [gold] + others
        r.shuffle(passages)
        if i % 2 == 0:
            contexts = [{"title": t["name"], "text": _town_passage(t)} for t in passages]
        else:
            contexts = [_town_passage(t) for t in passages]
        if i % 5 == 0:  # an unrelated distractor passage of general prose
            contexts.append(_science(r) if isinstance(contexts[0], str)
                            else {"title": "Notes", "text": _science(r)})
        rows.append({"question": q.format(name=gold["name"]), "contexts": contexts,
                     "answer": a(gold)})
    return rows


def make_rag_collection(n_towns: int = 40, n_notes: int = 20, seed: int = 4
                        ) -> tuple[list[dict], list[dict]]:
    """(passages, qa): a passage collection for ``spmd-lora rag-data`` (``{"id", "title",
    "text"}``: one passage per invented town, plus general prose notes) and QA rows about the
    towns (``{"question", "answer", "oracle"}``, the oracle being the town's passage id); each
    town answers two of :data:`QUESTIONS`."""
    r = random.Random(seed)
    used: set = set()
    towns = [_town_fact(r, used) for _ in range(n_towns)]
    passages = [{"id": f"town-{i:02d}", "title": t["name"], "text": _town_passage(t)}
                for i, t in enumerate(towns)]
    makers = [_science, _history]
    passages += [{"id": f"note-{i:02d}", "title": "Notes", "text": makers[i % 2](r)}
                 for i in range(n_notes)]
    qa = []
    for i, t in enumerate(towns):
        for q, a in r.sample(QUESTIONS, 2):
            qa.append({"question": q.format(name=t["name"]), "answer": a(t),
                       "oracle": f"town-{i:02d}"})
    return passages, qa


def make_text(n: int = 32, seed: int = 3) -> list[dict]:
    r = random.Random(seed)
    makers = [_science, _history, _cooking, _geography, _daily]
    return [{"text": makers[i % len(makers)](r)} for i in range(n)]


def make_dpo(alpaca: list[dict], n: int = 32, shift: int = 7) -> list[dict]:
    """Preference rows from Alpaca rows: row i's answer is chosen, row (i + shift)'s (a
    different task) rejected."""
    rows = []
    for i in range(n):
        rec = alpaca[i]
        prompt = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "") + "\nAnswer:"
        rows.append({"prompt": prompt, "chosen": " " + rec["output"],
                     "rejected": " " + alpaca[(i + shift) % len(alpaca)]["output"]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out: Path = HERE) -> None:
    out = Path(out)
    (out / "corpus.txt").write_text(make_corpus(), encoding="utf-8")
    _write_jsonl(out / "alpaca_sample.jsonl", make_alpaca())
    _write_jsonl(out / "rag_sample.jsonl", make_rag())
    _write_jsonl(out / "text_sample.jsonl", make_text())
    passages, qa = make_rag_collection()
    _write_jsonl(out / "rag_passages.jsonl", passages)
    _write_jsonl(out / "rag_qa.jsonl", qa)
    _write_jsonl(out / "dpo_sample.jsonl", make_dpo(make_alpaca()))


if __name__ == "__main__":
    main()
