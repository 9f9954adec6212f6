"""Write a small synthetic LLaVA-format data set whose questions need different levels of detail.

Each image is a rendered scene: a background colour, a few non-overlapping shapes and one tiny
glyph (a letter a few pixels high). Questions are tagged in the record's "question_type":
  coarse  background colour; colour of the largest shape (survives heavy pooling)
  medium  how many shapes there are; kind of the largest shape (needs its outline: a few patches)
  fine    which glyph is written, or its colour (a few pixels: heavy pooling loses it)
  text    text-only arithmetic and word facts
Answers are one word or number, for exact-match scoring. Same seed, same files.

--llava-like instead writes records with LLaVA-Instruct-like lengths (random words, text
lengths lognormal around ~120 tokens, 2% long ones, 10% text-only) that all share one scene
image: for measuring packing, not for training.

    python -m tools.make_synthetic --out data/synth --n 2000
"""

import argparse
import json
import math
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.chat import IMAGE_TOKEN

# Each colour question draws its answer from its own palette: the question then says which set
# of words can answer it, and the image which word of that set. A 2-layer LM trained from
# scratch for minutes learns that; with one shared palette it must also learn to tell a
# background from a shape of the same colour, and answers every colour question alike.
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "pink": (250, 160, 200), "cyan": (120, 230, 240)}
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
                 "black": (10, 10, 10)}
GLYPH_COLOURS = {"orange": (250, 130, 0), "purple": (130, 30, 170), "brown": (110, 60, 20)}
SHAPES = ["circle", "square", "triangle"]
MAX_SHAPES = 3

# A 3x5 bitmap font of letters (digits would collide with the shape counts): drawn at one pixel
# per cell on a 64 px image, so after pooling the 16x16 patch grid to 4x4 it covers a few
# percent of one pooled cell.
GLYPHS = {
    "A": [".#.", "#.#", "###", "#.#", "#.#"], "E": ["###", "#..", "##.", "#..", "###"],
    "H": ["#.#", "#.#", "###", "#.#", "#.#"], "K": ["#.#", "##.", "#..", "##.", "#.#"],
    "T": ["###", ".#.", ".#.", ".#.", ".#."], "X": ["#.#", "#.#", ".#.", "#.#", "#.#"],
}

# Short LLaVA-style instructions; they give prompts a realistic share of text next to the image.
INSTRUCTIONS = [
    "Answer the question using a single word or number.",
    "Look at the picture carefully and reply with one word or number only.",
    "Use one word or a number to answer.",
]

WORD_FACTS = [
    ("What is the opposite of hot?", "cold"), ("What is the opposite of up?", "down"),
    ("What is the opposite of day?", "night"), ("What colour is snow?", "white"),
    ("How many legs does a spider have?", "8"), ("How many days are in a week?", "7"),
    ("What is the plural of mouse?", "mice"), ("What animal says moo?", "cow"),
    ("How many sides does a triangle have?", "3"), ("What is the first letter of the alphabet?", "A"),
]


def place_shapes(rng, size, count):
    """Non-overlapping bounding boxes (x, y, side): one large shape (3/8 to 1/2 of the image
    side, so 'largest' is plain at any pooling) and up to count - 1 small ones (1/8 to 1/5)."""
    sides = [rng.randrange(size * 3 // 8, size // 2)] + [rng.randrange(size // 8, size // 5) for _ in range(count - 1)]
    boxes = []
    for side in sorted(sides, reverse=True):
        for _ in range(200):
            x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
            if all(x + side <= bx or bx + bs <= x or y + side <= by or by + bs <= y for bx, by, bs in boxes):
                boxes.append((x, y, side))
                break
    return boxes


def draw_shape(draw, kind, box, colour):
    x, y, s = box
    if kind == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=colour)
    elif kind == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
    else:
        draw.polygon([(x + s / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=colour)


def render_scene(rng, size):
    """Return (PIL image, facts dict) for one random scene."""
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    shapes = []
    for box in place_shapes(rng, size, rng.randint(1, MAX_SHAPES)):
        kind = rng.choice(SHAPES)
        colour = rng.choice(list(SHAPE_COLOURS))
        draw_shape(draw, kind, box, SHAPE_COLOURS[colour])
        shapes.append({"kind": kind, "colour": colour, "box": box})
    # The glyph goes on a free spot of background, one pixel per font cell at 64 px.
    scale = max(1, size // 64)
    glyph = rng.choice(list(GLYPHS))
    glyph_colour = rng.choice(list(GLYPH_COLOURS))
    gw, gh = 3 * scale, 5 * scale
    for _ in range(500):
        gx, gy = rng.randrange(1, size - gw - 1), rng.randrange(1, size - gh - 1)
        if all(gx + gw < bx or bx + bs < gx or gy + gh < by or by + bs < gy for bx, by, bs in (s["box"] for s in shapes)):
            break
    for row, line in enumerate(GLYPHS[glyph]):
        for col, cell in enumerate(line):
            if cell == "#":
                x0, y0 = gx + col * scale, gy + row * scale
                draw.rectangle([x0, y0, x0 + scale - 1, y0 + scale - 1], fill=GLYPH_COLOURS[glyph_colour])
    largest = max(shapes, key=lambda s: s["box"][2])
    facts = {"background": background, "count": len(shapes), "largest_kind": largest["kind"],
             "largest_colour": largest["colour"], "glyph": glyph, "glyph_colour": glyph_colour}
    return image, facts


def image_questions(facts):
    """(question_type, question, answer) for every question this scene can answer."""
    return [
        ("coarse", "What colour is the background?", facts["background"]),
        ("coarse", "What colour is the largest shape?", facts["largest_colour"]),
        ("medium", "What kind of shape is the largest one: circle, square or triangle?", facts["largest_kind"]),
        ("medium", "How many shapes are in the image, not counting the tiny character?", str(facts["count"])),
        ("fine", "Which letter is written in tiny print?", facts["glyph"]),
        ("fine", "What colour is the tiny letter?", facts["glyph_colour"]),
    ]


def text_question(rng):
    if rng.random() < 0.5:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", str(a + b)
        return f"What is {max(a, b)} minus {min(a, b)}?", str(max(a, b) - min(a, b))
    return rng.choice(WORD_FACTS)


def make_record(rng, index, out_dir, image_size, text_only_fraction, multi_turn_fraction):
    record_id = f"synth-{index:06d}"
    if rng.random() < text_only_fraction:
        question, answer = text_question(rng)
        return {"id": record_id, "question_type": "text", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    image, facts = render_scene(rng, image_size)
    rel_path = f"images/{record_id}.png"
    image.save(os.path.join(out_dir, rel_path))
    # Pick the question types first so coarse, medium and fine are equally common.
    by_type = {}
    for qtype, question, answer in image_questions(facts):
        by_type.setdefault(qtype, []).append((qtype, question, answer))
    qtypes = rng.sample(sorted(by_type), 2 if rng.random() < multi_turn_fraction else 1)
    questions = [rng.choice(by_type[qtype]) for qtype in qtypes]
    instruction = rng.choice(INSTRUCTIONS)
    conversations = []
    for turn, (_, question, answer) in enumerate(questions):
        prompt = f"{IMAGE_TOKEN}\n{question} {instruction}" if turn == 0 else question
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    # A record's type is that of its last question, the one evaluation scores.
    return {"id": record_id, "image": rel_path, "question_type": questions[-1][0], "conversations": conversations}


def llava_like_record(rng, index, text_only_fraction, word_list):
    """A record of random words whose length follows LLaVA-Instruct's rough shape (~2 tokens a word)."""
    words = rng.randint(240, 600) if rng.random() < 0.02 else max(4, int(rng.lognormvariate(math.log(44), 0.6)))
    question_words = max(2, words // 5)
    question = " ".join(rng.choice(word_list) for _ in range(question_words))
    answer = " ".join(rng.choice(word_list) for _ in range(words - question_words))
    record = {"id": f"llava-like-{index:06d}", "question_type": "text", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if rng.random() >= text_only_fraction:
        record.update(image="images/scene.png", question_type="description")
        record["conversations"][0]["value"] = f"{IMAGE_TOKEN}\n{question}"
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder: data.json and images/ go here")
    parser.add_argument("--n", type=int, required=True, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--text-only-fraction", type=float, default=0.1)
    parser.add_argument("--multi-turn-fraction", type=float, default=0.2, help="image records with two Q/A turns")
    parser.add_argument("--llava-like", action="store_true", help="LLaVA-like lengths of random words (see above)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.image_size < 32:
        parser.error("--n must be >= 1 and --image-size >= 32")

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    rng = random.Random(args.seed)
    if args.llava_like:
        render_scene(rng, args.image_size)[0].save(os.path.join(args.out, "images", "scene.png"))
        word_list = sorted({w for _, q, a in image_questions(render_scene(rng, 64)[1]) for w in (q + " " + a).split()})
        records = [llava_like_record(rng, i, args.text_only_fraction, word_list) for i in range(args.n)]
    else:
        records = [make_record(rng, i, args.out, args.image_size, args.text_only_fraction, args.multi_turn_fraction)
                   for i in tqdm(range(args.n), desc="rendering", unit="rec")]
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.out}/data.json")


if __name__ == "__main__":
    main()
