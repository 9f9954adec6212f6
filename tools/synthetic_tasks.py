"""Small datasets in the schemas of lmms-eval's POPE, MME and SEED-Bench, asked about the synthetic
scenes of held-out shards (tools.make_synthetic): the colours that each record's questions and
answers tell, asked as yes/no and four-choice questions.

    pope:       per scene, "Is there a <colour> <object> in the image?" with the true colour (yes)
                and another of the object's palette (no)
    mme:        per scene, the pair "Is the <object> <colour>? Please answer yes or no." (Yes, No),
                one question_id, category "color", as MME scores pairs
    seedbench:  per scene, "What colour is the <object>?" with the object's four palette colours
                as choices A-D

and, from the clips of held-out shards (tools.make_synthetic --video-fraction), datasets in the
schema of lmms-eval's MVBench ("video": the clip's file, written beside them, by its absolute path,
which MVBench's doc_to_visual passes through; "question", "candidates", "answer"), a
multiple-choice question per clip:

    mvbench_moving_direction:  Which way did the shape move? (left, right, up, down)
    mvbench_moving_attribute:  What colour was the shape at the start / at the end? (four colours)
    mvbench_action_count:      How many times did the shape change colour? (0 to 3)

tools.local_tasks --synthetic writes them (those the shards have data for) and points copies of
lmms-eval's tasks at them.
"""

import io
import json
import random
import re
from pathlib import Path

from PIL import Image

from pipeline.data.mixture import resolve_source
from pipeline.model.video import VIDEO_EXTENSIONS
from tools.make_synthetic import BACKGROUNDS, DOT_COLOURS, LARGE_COLOURS, SMALL_COLOURS
from tools.synthetic_clips import DIRECTIONS, QUESTIONS

OBJECT_PALETTES = {"background": BACKGROUNDS, "large shape": LARGE_COLOURS, "small square": SMALL_COLOURS,
                   "left dot": DOT_COLOURS}
COLOUR_QUESTION = re.compile(r"What colour is the (.+?)\?")
LETTERS = "ABCD"
# MVBench's task (its dataset here): the clip questions it asks, and their candidates
VIDEO_TASKS = {"mvbench_moving_direction": ["video_direction"],
               "mvbench_moving_attribute": ["video_first", "video_last"],
               "mvbench_action_count": ["video_changes"]}
CANDIDATES = {"video_direction": sorted(DIRECTIONS), "video_first": sorted(LARGE_COLOURS),
              "video_last": sorted(LARGE_COLOURS), "video_changes": ["0", "1", "2", "3"]}


def samples_of(shards):
    import webdataset as wds

    return wds.tarfile_to_samples()({"url": url} for url in resolve_source(str(shards))[0])


def scenes(shards, limit=None):
    """(key, RGB image, object, colour) for the first `limit` records with an image: the object
    and colour of the record's last colour question."""
    found = []
    for sample in samples_of(shards):
        record = json.loads(sample["json"])
        if "image" not in record:
            continue
        facts = [(COLOUR_QUESTION.search(q["value"]), a["value"])
                 for q, a in zip(record["conversations"][::2], record["conversations"][1::2])]
        facts = [(match.group(1), colour) for match, colour in facts if match and match.group(1) in OBJECT_PALETTES]
        if not facts:
            continue
        image = Image.open(io.BytesIO(sample[Path(record["image"]).suffix.lstrip(".").lower()])).convert("RGB")
        found.append((sample["__key__"], image, *facts[-1]))
        if len(found) == limit:
            break
    return found


def clips(shards, limit=None):
    """(key, clip bytes, question type, answer) for the first `limit` records with a clip: the type
    and answer of the record's last question."""
    found = []
    for sample in samples_of(shards):
        record = json.loads(sample["json"])
        if record.get("question_type") in QUESTIONS and "video" in record:
            data = next(sample[ext] for ext in VIDEO_EXTENSIONS if ext in sample)
            found.append((sample["__key__"], data, record["question_type"], record["conversations"][-1]["value"]))
            if len(found) == limit:
                break
    return found


def mvbench_rows(clips_, question_types, videos, rng):
    """MVBench's documents for the clips asking one of question_types; the clips are written to videos/."""
    rows = []
    for key, data, question_type, answer in clips_:
        if question_type not in question_types:
            continue
        path = Path(videos).resolve() / f"{key}.mp4"
        path.write_bytes(data)
        candidates = list(CANDIDATES[question_type])
        rng.shuffle(candidates)
        rows.append({"video": str(path), "question": QUESTIONS[question_type], "candidates": candidates,
                     "answer": answer})
    return rows


def other_colour(rng, obj, colour):
    return rng.choice(sorted(set(OBJECT_PALETTES[obj]) - {colour}))


def pope_rows(scenes_, rng):
    rows = []
    for key, image, obj, colour in scenes_:
        for shown, answer in ((colour, "yes"), (other_colour(rng, obj, colour), "no")):
            rows.append({"id": str(len(rows)), "question_id": str(len(rows)),
                         "question": f"Is there a {shown} {obj} in the image?", "answer": answer,
                         "image_source": key, "image": image, "category": "random"})
    return rows


def mme_rows(scenes_, rng):
    rows = []
    for key, image, obj, colour in scenes_:
        for shown, answer in ((colour, "Yes"), (other_colour(rng, obj, colour), "No")):
            rows.append({"question_id": f"color/{key}.png", "image": image, "category": "color",
                         "question": f"Is the {obj} {shown}? Please answer yes or no.", "answer": answer})
    return rows


def seedbench_rows(scenes_, rng):
    rows = []
    for index, (key, image, obj, colour) in enumerate(scenes_):
        choices = sorted(OBJECT_PALETTES[obj])
        rng.shuffle(choices)
        rows.append({"question": f"What colour is the {obj}?", **{f"choice_{c.lower()}": choice
                                                                   for c, choice in zip(LETTERS, choices, strict=True)},
                     "answer": LETTERS[choices.index(colour)], "data_id": f"{key}.png", "data_type": "image",
                     "question_id": str(index), "question_type_id": 3,  # SEED-Bench's "instance attributes"
                     "image": [image]})
    return rows


def features(kind):
    import datasets

    text = datasets.Value("string")
    if kind == "pope":
        return datasets.Features({"id": text, "question_id": text, "question": text, "answer": text,
                                  "image_source": text, "image": datasets.Image(), "category": text})
    if kind == "mme":
        return datasets.Features({"question_id": text, "image": datasets.Image(), "question": text, "answer": text,
                                  "category": text})
    return datasets.Features(
        {
            "question": text,
            **{f"choice_{c.lower()}": text for c in LETTERS},
            "answer": text,
            "data_id": text,
            "data_type": text,
            "question_id": text,
            "question_type_id": datasets.Value("int16"),
            "image": datasets.Sequence(datasets.Image()),
        }
    )


BUILDERS = {"pope": pope_rows, "mme": mme_rows, "seedbench": seedbench_rows}


def write_datasets(shards, out, limit=None, seed=0):
    """OUT/pope, OUT/mme and OUT/seedbench (DatasetDicts with a test split, datasets' save_to_disk)
    from the first `limit` scenes of the shards, and OUT/mvbench_* (a train split, as MVBench's)
    from the first `limit` clips, their files in OUT/videos. Returns {kind or task: folder} for the
    kinds the shards hold; ValueError when they hold neither scenes nor clips."""
    import datasets

    found, found_clips = scenes(shards, limit), clips(shards, limit)
    if not found and not found_clips:
        raise ValueError(f"{shards}: no record with an image and a colour question, nor a clip (made by "
                         f"tools.make_synthetic?)")
    folders = {}
    for kind, build in BUILDERS.items() if found else ():
        rows = build(found, random.Random(seed))
        table = datasets.Dataset.from_list(rows, features=features(kind))
        folders[kind] = Path(out) / kind
        datasets.DatasetDict({"test": table}).save_to_disk(str(folders[kind]))
    videos = Path(out) / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for task, question_types in VIDEO_TASKS.items():
        rows = mvbench_rows(found_clips, question_types, videos, random.Random(seed))
        if rows:
            folders[task] = Path(out) / task
            datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folders[task]))
    return folders
