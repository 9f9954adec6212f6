"""Write a small synthetic LLaVA-format data set whose questions need different levels of detail.

Each image is a rendered scene: a background, one large shape, one small square and two dots
side by side, each coloured from its own palette (the two dots in two different colours of
theirs). Questions are tagged in the record's "question_type":
  coarse  colour of the background or of the large shape (survives any pooling)
  medium  colour of the small square (about one pooled cell at N = 16)
  fine    colour of the left dot: the pair lies inside one pooled cell at N = 16, where averaging
          leaves both colours and loses which is left; from N = 64 on the dots are tokens of their own
  text    text-only arithmetic and word facts
Answers are one word or number, for exact-match scoring. Same seed, same files.

--split train|validation|test: the three splits partition the space of scenes and the space of
text questions (split_of: a stable hash of a scene's drawing or of a question's text picks the
split that owns it), so whatever their seeds no image and no text question is in two splits.
Record ids and image names start with the split ("test-000042").
Where resolution and several images matter (for data.max_tiles > 1 and multi-image training):
  --wide-fraction F   image records whose scene is 4x as wide as high, or as high as wide
                      (half each), objects at the sizes of a square scene's: one tile of the
                      tower's size shrinks the whole scene 4x (each 8 px dot to 2 px), while
                      a 1 x 4 (or 4 x 1) grid of tiles sees it at full size. Their question_type
                      is prefixed wide_ or tall_ (wide_fine: the left dot's colour in a wide scene).
  --multi-image-fraction F
                      image records with two scenes ("image": [two paths], two <image> tags)
                      asking about one of them; question_type multi_<type>.
Where time matters (video, docs/video.md):
  --video-fraction F  records of a short clip (videos/<id>.mp4, "video" and an <image> tag as
                      LLaVA-Video-178K's records have them) asking which colour a moving shape
                      had first or last, which way it moved or how many times it changed
                      colour (question_type video_first, video_last, video_direction,
                      video_changes; tools/synthetic_clips.py). Clips are split like scenes.

--llava-like instead writes records with LLaVA-Instruct-like lengths (random words, text
lengths lognormal around ~120 tokens, 2% long ones, 10% text-only) that all share one scene
image: for measuring packing, not for training.

    python -m tools.make_synthetic --out data/synth/train --n 10000 --split train
    python -m tools.make_synthetic --out data/synth/test --n 1000 --split test
"""

import argparse
import hashlib
import json
import math
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.model.chat import IMAGE_TOKEN
from tools import synthetic_clips

# Every question asks the colour of one object, and each object draws its colour from its own
# palette: the question says which set of words can answer, the image which word of it. The
# objects shrink from coarse to fine (sides at 64 px; they scale with --image-size):
#   background    the whole image          coarse
#   large shape   24-32 px                 coarse
#   small square  14-18 px                 medium
#   two dots      8 px each, side by side  fine: which colour is on the left
# The dot pair fills the width of one cell of the 4 x 4 grid that N = 16 pools the tower's 16 x 16
# patches into, and sits on the patch grid (its top on a multiple of 4 px): at N = 16 one token
# averages both dots' features, which keeps only the trace of left and right that the tower's
# position-dependent features leave; from N = 64 on each dot has tokens of its own. The question
# asks for the left one, the first of the two in the tokens' row-major order: in issue 30's probes
# a tiny LM learned that, but not the left or the right one asked at random. The 10 px dot's
# colour that this question replaced stayed at chance after the demo's training, at every N;
# bench/fine_question_trials.md has what training on this one gave.
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "pink": (250, 160, 200), "cyan": (120, 230, 240)}
LARGE_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
SMALL_COLOURS = {"black": (10, 10, 10), "orange": (250, 130, 0), "purple": (130, 30, 170), "brown": (110, 60, 20)}
DOT_COLOURS = {"lime": (150, 255, 0), "navy": (0, 0, 110), "magenta": (255, 0, 255), "olive": (128, 128, 0)}
SHAPES = ["circle", "square", "triangle"]

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


def place_boxes(rng, size, sides, taken=()):
    """Non-overlapping (x, y, side) boxes with a 1 px margin, placed in order, clear of the
    (x, y, width, height) rectangles in taken; None when a box finds no room in 100 tries."""
    boxes = []
    for side in sides:
        for _ in range(100):
            x, y = rng.randrange(1, size - side - 1), rng.randrange(1, size - side - 1)
            if all(x + side < bx or bx + bw < x or y + side < by or by + bh < y
                   for bx, by, bw, bh in [*taken, *((bx, by, bs, bs) for bx, by, bs in boxes)]):
                boxes.append((x, y, side))
                break
        else:
            return None
    return boxes


def place_dot_pair(rng, size):
    """(x, y, side) of the left dot; the right one is at x + side. The pair fills the width of one
    cell of the 4 x 4 grid (size / 4 px: one token at N = 16) and is half as high, its top on a
    multiple of the tower's patch (size / 16 px, 4 px at 64) inside the cell."""
    cell, patch, side = size // 4, size // 16, size // 8
    x = cell * rng.randrange(4)
    y = cell * rng.randrange(4) + patch * rng.randrange((cell - side) // patch + 1)
    return x, y, side


def draw_shape(draw, kind, box, colour):
    x, y, s = box
    if kind == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=colour)
    elif kind == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
    else:
        draw.polygon([(x + s / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=colour)


def draw_scene(rng, size, layout="square"):
    """One random scene's description: the colours (its facts), the large shape's kind and the
    boxes (large shape, small square, left dot, right dot). layout wide or tall: a canvas 4 sizes
    long, the objects as large as in a square scene, in one square section of it at a random place
    along it."""
    left_dot, right_dot = rng.sample(sorted(DOT_COLOURS), 2)
    facts = {"background": rng.choice(list(BACKGROUNDS)), "large": rng.choice(list(LARGE_COLOURS)),
             "small": rng.choice(list(SMALL_COLOURS)), "left_dot": left_dot, "right_dot": right_dot}
    offset = 0 if layout == "square" else rng.randrange(0, 3 * size + 1)
    sides = [rng.randrange(size * 3 // 8, size // 2 + 1), rng.randrange(size * 7 // 32, size * 9 // 32 + 1)]
    boxes = None
    while boxes is None:  # a fresh layout, the dots' place too, until the shapes find room beside them
        dot_x, dot_y, dot_side = place_dot_pair(rng, size)
        boxes = place_boxes(rng, size, sides, taken=[(dot_x, dot_y, 2 * dot_side, dot_side)])
    boxes += [(dot_x, dot_y, dot_side), (dot_x + dot_side, dot_y, dot_side)]
    boxes = [(x + offset * (layout == "wide"), y + offset * (layout == "tall"), side) for x, y, side in boxes]
    scene = {"facts": facts, "shape": rng.choice(SHAPES), "boxes": boxes, "size": size}
    # (a square scene's description, and so the split its hash picks, has no layout key)
    return scene if layout == "square" else scene | {"layout": layout}


def render(scene):
    """The scene's PIL image: background, large shape, small square, left and right dot."""
    facts, (large, small, left_dot, right_dot), size = scene["facts"], scene["boxes"], scene["size"]
    canvas = {"square": (size, size), "wide": (4 * size, size), "tall": (size, 4 * size)}[scene.get("layout", "square")]
    image = Image.new("RGB", canvas, BACKGROUNDS[facts["background"]])
    draw = ImageDraw.Draw(image)
    draw_shape(draw, scene["shape"], large, LARGE_COLOURS[facts["large"]])
    draw_shape(draw, "square", small, SMALL_COLOURS[facts["small"]])
    draw_shape(draw, "square", left_dot, DOT_COLOURS[facts["left_dot"]])
    draw_shape(draw, "square", right_dot, DOT_COLOURS[facts["right_dot"]])
    return image


def render_scene(rng, size):
    """Return (PIL image, facts dict) for one random scene of any split."""
    scene = draw_scene(rng, size)
    return render(scene), scene["facts"]


def image_questions(facts):
    """(question_type, question, answer) for every question this scene can answer."""
    return [
        ("coarse", "What colour is the background?", facts["background"]),
        ("coarse", "What colour is the large shape?", facts["large"]),
        ("medium", "What colour is the small square?", facts["small"]),
        ("fine", "What colour is the left dot?", facts["left_dot"]),
    ]


# ---- splits: train, validation and test own disjoint parts of the scene and question spaces ----

SPLITS = ("train", "validation", "test")
SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}  # of 10 hash buckets


def split_of(description):
    """The split that owns a scene or a text question, from a stable hash of its description
    (not Python's hash(), which changes per process)."""
    bucket = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "big") % 10
    return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def scene_in_split(rng, size, split, layout="square"):
    """A random scene that `split` owns: scenes are drawn until one belongs to it."""
    while True:
        scene = draw_scene(rng, size, layout)
        if split_of(json.dumps(scene, sort_keys=True)) == split:
            return scene


def text_question_in_split(rng, split):
    """(question, answer) of a random text question that `split` owns."""
    while True:
        question, answer = text_question(rng)
        if split_of(question) == split:
            return question, answer


def text_question(rng):
    if rng.random() < 0.5:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", str(a + b)
        return f"What is {max(a, b)} minus {min(a, b)}?", str(max(a, b) - min(a, b))
    return rng.choice(WORD_FACTS)


def make_record(rng, split, index, out_dir, image_size, text_only_fraction, multi_turn_fraction, wide_fraction=0.0,
                multi_image_fraction=0.0, video_fraction=0.0, fine_fraction=None):
    record_id = f"{split}-{index:06d}"
    if rng.random() < text_only_fraction:
        question, answer = text_question_in_split(rng, split)
        return {"id": record_id, "question_type": "text", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if video_fraction and rng.random() < video_fraction:
        return video_record(rng, split, record_id, out_dir, image_size, multi_turn_fraction)
    # (no draws for a fraction of 0: the default data stay what they were before these options)
    if multi_image_fraction and rng.random() < multi_image_fraction:
        return multi_image_record(rng, split, record_id, out_dir, image_size)
    layout = rng.choice(["wide", "tall"]) if wide_fraction and rng.random() < wide_fraction else "square"
    scene = scene_in_split(rng, image_size, split, layout)
    facts = scene["facts"]
    rel_path = f"images/{record_id}.png"
    render(scene).save(os.path.join(out_dir, rel_path))
    # The last question is the one evaluation scores: its type is drawn first, so that coarse,
    # medium and fine are equally common among scored questions (or fine in fine_fraction of them,
    # the others coarse or medium alike). A multi-turn record asks every other question of its
    # scene before it, in random order: one image, several answers to learn.
    questions = image_questions(facts)
    if fine_fraction is None:
        last_type = rng.choice(sorted({qtype for qtype, _, _ in questions}))
    else:
        last_type = "fine" if rng.random() < fine_fraction else rng.choice(["coarse", "medium"])
    last = rng.choice([q for q in questions if q[0] == last_type])
    earlier = [q for q in questions if q is not last] if rng.random() < multi_turn_fraction else []
    rng.shuffle(earlier)
    questions = earlier + [last]
    instruction = rng.choice(INSTRUCTIONS)
    conversations = []
    for turn, (_, question, answer) in enumerate(questions):
        prompt = f"{IMAGE_TOKEN}\n{question} {instruction}" if turn == 0 else question
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    # A record's type is that of its last question, the one evaluation scores.
    question_type = questions[-1][0] if layout == "square" else f"{layout}_{questions[-1][0]}"
    return {"id": record_id, "image": rel_path, "question_type": question_type, "conversations": conversations}


def multi_image_record(rng, split, record_id, out_dir, image_size):
    """Two scenes, one question about one of them, as LLaVA-OneVision's multi-image records:
    "image" a list, one <image> tag per image in the same order."""
    paths, scenes = [], []
    for i in range(2):
        scene = scene_in_split(rng, image_size, split)
        paths.append(f"images/{record_id}-{i}.png")
        render(scene).save(os.path.join(out_dir, paths[-1]))
        scenes.append(scene["facts"])
    which = rng.randrange(2)
    question_type, question, answer = rng.choice(image_questions(scenes[which]))
    ordinal = ("first", "second")[which]
    prompt = (f"Image 1: {IMAGE_TOKEN}\nImage 2: {IMAGE_TOKEN}\nIn the {ordinal} image: {question} "
              f"{rng.choice(INSTRUCTIONS)}")
    return {"id": record_id, "image": paths, "question_type": f"multi_{question_type}",
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def clip_in_split(rng, size, split):
    """A random clip that `split` owns (see split_of): clips are drawn until one belongs to it."""
    while True:
        clip = synthetic_clips.draw_clip(rng, size, sorted(BACKGROUNDS), sorted(LARGE_COLOURS))
        if split_of(json.dumps(clip, sort_keys=True)) == split:
            return clip


def video_record(rng, split, record_id, out_dir, image_size, multi_turn_fraction):
    """A clip and its questions, in LLaVA-Video-178K's form: "video" and an <image> tag for it. The
    last question's type is drawn first, as for scenes; a multi-turn record asks the others before it."""
    clip = clip_in_split(rng, image_size, split)
    rel_path = f"videos/{record_id}.mp4"
    frames = synthetic_clips.render_frames(clip, BACKGROUNDS, LARGE_COLOURS, draw_shape)
    with open(os.path.join(out_dir, rel_path), "wb") as f:
        f.write(synthetic_clips.encode_mp4(frames))
    answers = synthetic_clips.facts(clip)
    types = sorted(synthetic_clips.QUESTIONS)
    last = rng.choice(types)
    earlier = [t for t in types if t != last] if rng.random() < multi_turn_fraction else []
    rng.shuffle(earlier)
    instruction = rng.choice(INSTRUCTIONS)
    conversations = []
    for turn, question_type in enumerate(earlier + [last]):
        question = synthetic_clips.QUESTIONS[question_type]
        prompt = f"{IMAGE_TOKEN}\n{question} {instruction}" if turn == 0 else question
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answers[question_type]}]
    return {"id": record_id, "video": rel_path, "question_type": last, "conversations": conversations}


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
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="the split whose scenes and text questions to draw (default: train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--text-only-fraction", type=float, default=0.1)
    parser.add_argument("--multi-turn-fraction", type=float, default=0.2,
                        help="image records that ask every question of their scene, not one (default: 0.2)")
    parser.add_argument("--fine-fraction", type=float, default=None,
                        help="image records whose scored (last) question is the fine one, the others coarse or "
                             "medium alike (default: a third, as each type)")
    parser.add_argument("--wide-fraction", type=float, default=0.0,
                        help="image records with a wide or tall scene, where tiles matter (see above; default: 0)")
    parser.add_argument("--multi-image-fraction", type=float, default=0.0,
                        help="image records with two scenes (see above; default: 0)")
    parser.add_argument("--video-fraction", type=float, default=0.0,
                        help="records of a short clip instead of a scene (see above; default: 0)")
    parser.add_argument("--llava-like", action="store_true", help="LLaVA-like lengths of random words (see above)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.image_size < 32:
        parser.error("--n must be >= 1 and --image-size >= 32")
    if args.fine_fraction is not None and not 0 <= args.fine_fraction <= 1:
        parser.error("--fine-fraction must be in [0, 1]")

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    if args.video_fraction:
        os.makedirs(os.path.join(args.out, "videos"), exist_ok=True)
    rng = random.Random(f"{args.split}:{args.seed}")
    if args.llava_like:
        render_scene(rng, args.image_size)[0].save(os.path.join(args.out, "images", "scene.png"))
        word_list = sorted({w for _, q, a in image_questions(render_scene(rng, 64)[1]) for w in (q + " " + a).split()})
        records = [llava_like_record(rng, i, args.text_only_fraction, word_list) for i in range(args.n)]
    else:
        records = [make_record(rng, args.split, i, args.out, args.image_size, args.text_only_fraction,
                               args.multi_turn_fraction, args.wide_fraction, args.multi_image_fraction,
                               args.video_fraction, args.fine_fraction)
                   for i in tqdm(range(args.n), desc=f"rendering {args.split}", unit="rec")]
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.out}/data.json")


if __name__ == "__main__":
    main()
