"""tools/make_synthetic and tools/build_shards on LLaVA JSON: validation counts, repeated ids, determinism
whatever the processes, an out folder another build left (tests/test_shard_inputs.py: other inputs, resume)."""

import io
import json
import os
import random

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tools import build_shards, make_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_synthetic.main(["--out", str(out), "--n", "60", "--seed", "3"])
    return out


def test_synthetic_is_deterministic_and_typed(synth, tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--n", "60", "--seed", "3"])
    assert (tmp_path / "data.json").read_bytes() == (synth / "data.json").read_bytes()
    records = json.loads((synth / "data.json").read_text())
    assert {r["question_type"] for r in records} == {"coarse", "medium", "fine", "text"}
    for r in records:
        assert ("image" in r) == (r["question_type"] != "text")
        assert all(len(t["value"].split()) == 1 for t in r["conversations"][1::2])  # one-word answers


def test_bad_records_are_counted_by_reason(synth, tmp_path):
    good = json.loads((synth / "data.json").read_text())[:10]
    image = next(r["image"] for r in good if "image" in r)
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    (tmp_path / "truncated.png").write_bytes((synth / image).read_bytes()[:60])
    os.symlink(synth / "images", tmp_path / "images")

    def rec(i, **kw):
        return {"id": f"bad-{i}", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                    {"from": "gpt", "value": "a"}], "image": image, **kw}
    bad = [
        rec(0, image="images/nope.png"), rec(1, image="garbage.png"), rec(2, image="truncated.png"),  # missing_image x3
        rec(3, conversations=[]), rec(4, conversations="hi"),                                          # malformed x8
        rec(5, conversations=[{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>"}]),
        rec(6, conversations=[{"from": "human", "value": "<image>"}, {"from": "robot", "value": "a"}]),
        rec(7, conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": " "}]),
        [1, 2], {"conversations": []}, "text",
        rec(8, conversations=[{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "a"}]),       # tag mismatch x3
        rec(9, conversations=[{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]),
        {"id": "bad-10", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(good + bad))
    manifest = build_shards.build(str(data), str(tmp_path), str(tmp_path / "out"), samples_per_shard=4)
    assert manifest["skipped"] == {"missing_image": 3, "malformed_conversation": 8, "image_tag_mismatch": 3,
                                   "image_outside_root": 0,
                                   "system_message": 0, "unreadable_video": 0, "no_video_stream": 0,
                                   "too_few_frames": 0, "several_videos": 0}
    assert manifest["total_samples"] == 10 and manifest["repeated_ids"] == 0
    # A shard holds what its slice of 4 input rows kept: rows 8-11 keep 2, rows 12-23 none.
    assert [(s["name"], s["num_samples"]) for s in manifest["shards"]] == \
        [("shard-000000.tar", 4), ("shard-000001.tar", 4), ("shard-000002.tar", 2)]
    assert manifest["skipped_examples"]["missing_image"] == ["bad-0", "bad-1", "bad-2"]

    # JSON Lines input: an unparsable line is a malformed record, the rest is kept.
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in good[:5]) + "\n{broken\n")
    manifest = build_shards.build(str(lines), str(synth), str(tmp_path / "out_jsonl"))
    assert manifest["total_samples"] == 5 and manifest["skipped"]["malformed_conversation"] == 1


def test_multi_image_records_are_kept_with_their_images_in_order(synth, tmp_path):
    """LLaVA-OneVision's multi-image records: "image" is a list, one path per <image> tag; a list
    whose length disagrees with the tags is skipped with its reason and id, as is a bad list."""
    good = [r for r in json.loads((synth / "data.json").read_text()) if "image" in r][:3]
    paths = [r["image"] for r in good]

    def rec(i, images, tags):
        return {"id": f"multi-{i}", "image": images,
                "conversations": [{"from": "human", "value": "<image>\n" * tags + "Same colour?"},
                                  {"from": "gpt", "value": "no"}]}
    records = [rec(0, paths[:2], 2), rec(1, [paths[2], paths[0], paths[1]], 3), rec(2, paths[:1], 1),
               rec(3, paths[:2], 1), rec(4, paths[:1], 2),                            # tag mismatch x2
               rec(5, [], 0), rec(6, [paths[0], 7], 2),                               # malformed x2
               rec(7, [paths[0], "images/nope.png"], 2)]                              # missing_image
    (tmp_path / "data.json").write_text(json.dumps(records))
    manifest = build_shards.build(str(tmp_path / "data.json"), str(synth), str(tmp_path / "out"))
    assert manifest["total_samples"] == 3
    assert manifest["skipped"] == {"missing_image": 1, "malformed_conversation": 2, "image_tag_mismatch": 2,
                                   "image_outside_root": 0,
                                   "system_message": 0, "unreadable_video": 0, "no_video_stream": 0,
                                   "too_few_frames": 0, "several_videos": 0}
    assert manifest["skipped_examples"]["image_tag_mismatch"] == ["multi-3", "multi-4"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    for sample, record in zip(samples, records[:3]):
        images = [k for k in sample if k[0].isdigit()]
        assert images == [f"{i}.png" for i in range(len(record["image"]))]
        for i, path in enumerate(record["image"]):
            assert sample[f"{i}.png"] == (synth / path).read_bytes()  # in the record's order


def test_records_with_repeated_ids_are_kept_and_counted(synth, tmp_path, capsys):
    """LLaVA-1.5's mix gives one COCO image id several records (LLaVA-Instruct, VQAv2, OK-VQA, ...),
    each with its own conversation: all of them are training data."""
    good = json.loads((synth / "data.json").read_text())[:6]
    again = [dict(good[1], conversations=[{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "b"}])
             for _ in range(2)]
    again = [{k: v for k, v in r.items() if k != "image"} for r in again] + [dict(good[2])]
    (tmp_path / "data.json").write_text(json.dumps(good + again))
    build_shards.main(
        ["--input", str(tmp_path / "data.json"), "--image-root", str(synth), "--out", str(tmp_path / "out")]
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_samples"] == 9 and manifest["repeated_ids"] == 3
    assert not any(manifest["skipped"].values())
    assert "repeated ids: 3 kept records" in capsys.readouterr().out
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(9)]  # keys are positions
    assert [json.loads(s["json"])["id"] for s in samples] == [r["id"] for r in good + again]
    assert json.loads(samples[6]["json"])["conversations"][1]["value"] == "b"


def test_build_is_byte_identical_whatever_the_processes_and_readable(synth, tmp_path):
    args = ["--input", str(synth / "data.json"), "--image-root", str(synth), "--samples-per-shard", "16"]
    build_shards.main(args + ["--out", str(tmp_path / "a")])
    build_shards.main(args + ["--out", str(tmp_path / "b"), "--workers", "2"])
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == ["manifest.json"] + [f"shard-{i:06d}.tar" for i in range(4)] + [
        f"slices/{i:06d}.json" for i in range(4)
    ]
    assert files == sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    records = json.loads((synth / "data.json").read_text())
    shards = sorted(str(p) for p in (tmp_path / "a").glob("shard-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in samples] == [r["id"] for r in records]
    for sample, record in zip(samples, records):
        if "image" in record:
            assert sample["png"] == (synth / record["image"]).read_bytes()  # original bytes kept


def test_max_image_side_shrinks_large_images_in_their_format_and_is_in_the_manifest(tmp_path):
    """A 900x300 JPEG and a 200x600 PNG with max side 300 are stored at 300x100 and 100x300 in
    their own formats, close to the original's pixels; a 120x80 image is stored byte for byte."""
    gradient = Image.linear_gradient("L").convert("RGB")
    images = {"wide.jpg": gradient.resize((900, 300)), "tall.png": gradient.resize((200, 600)),
              "small.png": gradient.resize((120, 80))}
    for name, image in images.items():
        image.save(tmp_path / name)
    records = [{"id": name, "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": "A gradient."}]}
               for name in images]
    (tmp_path / "data.json").write_text(json.dumps(records))
    manifest = build_shards.build(str(tmp_path / "data.json"), str(tmp_path), str(tmp_path / "out"), max_image_side=300)
    assert manifest["max_image_side"] == 300 and manifest["total_samples"] == 3
    samples = {json.loads(s["json"])["id"]: s for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"),
                                                                      shardshuffle=False)}
    assert samples["small.png"]["png"] == (tmp_path / "small.png").read_bytes()
    for name, ext, size in [("wide.jpg", "jpg", (300, 100)), ("tall.png", "png", (100, 300))]:
        stored = Image.open(io.BytesIO(samples[name][ext]))
        assert stored.format == ("JPEG" if ext == "jpg" else "PNG") and stored.size == size
        expected = images[name].resize(size, Image.Resampling.BICUBIC)
        difference = np.abs(np.asarray(stored, dtype=int) - np.asarray(expected, dtype=int))
        assert difference.mean() < 2


def test_a_build_with_other_settings_replaces_what_an_earlier_one_left(synth, tmp_path):
    """Another build's shards, reports and temporary files are gone once the new manifest is
    written, and its stale manifest as soon as the new build starts; a rerun with the same
    arguments rebuilds nothing."""
    out = tmp_path / "out"
    build_shards.build(str(synth / "data.json"), str(synth), str(out), samples_per_shard=10)
    (out / "shard-000003.tar.999.tmp").write_bytes(b"left by a killed process")
    manifest = build_shards.build(str(synth / "data.json"), str(synth), str(out), samples_per_shard=100)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["manifest.json", "shard-000000.tar", "slices/000000.json"]
    assert manifest["shards"][0]["num_bytes"] == os.path.getsize(out / "shard-000000.tar")
    result = build_shards.main(["--input", str(synth / "data.json"), "--image-root", str(synth), "--out", str(out),
                                "--samples-per-shard", "100"])
    assert (result.slices_built, result.slices_kept) == (0, 1) and result.manifest == manifest

    def fail(*args, **kwargs):
        assert not (out / "manifest.json").exists(), "the other build's manifest outlived its start"
        raise RuntimeError("stop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_shards.builder.SliceBuilder, "build_slice", fail)
        with pytest.raises(RuntimeError, match="stop"):
            build_shards.build(str(synth / "data.json"), str(synth), str(out), samples_per_shard=30)


def test_scene_objects_shrink_from_coarse_to_fine_and_carry_their_answers():
    """Each question's answer is the colour of its object in the image, and the objects get
    smaller from coarse to fine (the detail a question needs is its object's size): the fine
    question asks the colour of the left one of two 8 px dots of two different colours."""
    rng = random.Random(0)
    for _ in range(20):
        image, facts = make_synthetic.render_scene(rng, 64)
        pixels = np.asarray(image)
        area = {key: int((pixels == palette[facts[key]]).all(-1).sum()) for key, palette in [
            ("background", make_synthetic.BACKGROUNDS), ("large", make_synthetic.LARGE_COLOURS),
            ("small", make_synthetic.SMALL_COLOURS), ("left_dot", make_synthetic.DOT_COLOURS),
            ("right_dot", make_synthetic.DOT_COLOURS)]}
        assert facts["left_dot"] != facts["right_dot"] and area["left_dot"] == area["right_dot"] == 8 * 8
        assert 14 * 14 <= area["small"] <= 18 * 18
        assert area["background"] > area["large"] > area["left_dot"] and area["small"] > area["left_dot"]
        assert area["large"] >= 0.9 * area["small"]  # (a 24 px triangle covers 300 px, an 18 px square 324)
        left_columns = np.nonzero((pixels == make_synthetic.DOT_COLOURS[facts["left_dot"]]).all(-1).any(0))[0]
        right_columns = np.nonzero((pixels == make_synthetic.DOT_COLOURS[facts["right_dot"]]).all(-1).any(0))[0]
        assert left_columns.max() + 1 == right_columns.min()  # side by side, the left one on the left
        answers = {question: answer for _, question, answer in make_synthetic.image_questions(facts)}
        assert answers["What colour is the left dot?"] == facts["left_dot"]


def test_the_fine_answer_is_lost_in_16_px_cell_means_and_kept_in_8_and_4_px_ones():
    """The two dots fill the width of one cell of the 4 x 4 grid that N = 16 pools 64 px into, on
    the 4 px patch grid: swapping their colours changes the answer and the image, but not the
    16 px cells' mean colours, while the means of 8 px cells (N = 64) and of 4 px patches (N = 256)
    change. (The tower's patch features depend on position too, so their pooled mean at N = 16
    still keeps a trace of which colour is left: the trained demo model reads it above chance.)"""
    def means(image, side):
        pixels = np.asarray(image, dtype=float)
        return pixels.reshape(64 // side, side, 64 // side, side, 3).mean((1, 3))

    rng = random.Random(1)
    for _ in range(50):
        scene = make_synthetic.draw_scene(rng, 64)
        left, right = scene["boxes"][2:]
        assert left[0] % 16 == 0 and right[0] == left[0] + 8 and left[1] == right[1] and left[2] == right[2] == 8
        assert left[1] % 4 == 0 and left[1] // 16 == (left[1] + 7) // 16  # inside one 16 px row of cells
        facts = scene["facts"]
        swapped = scene | {"facts": facts | {"left_dot": facts["right_dot"], "right_dot": facts["left_dot"]}}
        image, image_swapped = make_synthetic.render(scene), make_synthetic.render(swapped)
        assert image.tobytes() != image_swapped.tobytes()
        assert np.allclose(means(image, 16), means(image_swapped, 16))
        assert not np.allclose(means(image, 8), means(image_swapped, 8))
        assert not np.allclose(means(image, 4), means(image_swapped, 4))


def test_multi_turn_records_ask_every_question_and_score_types_equally(tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--n", "600", "--multi-turn-fraction", "0.5",
                         "--text-only-fraction", "0"])
    records = json.loads((tmp_path / "data.json").read_text())
    turns = [len(r["conversations"]) // 2 for r in records]
    assert set(turns) == {1, 4} and 0.4 < turns.count(4) / len(turns) < 0.6
    for r in records:
        questions = [t["value"].split("\n")[-1].split("?")[0] for t in r["conversations"][::2]]
        assert len(set(questions)) == len(questions)  # no question asked twice
    scored = [r["question_type"] for r in records]
    assert all(0.27 < scored.count(t) / len(scored) < 0.4 for t in ("coarse", "medium", "fine"))


def test_fine_fraction_sets_the_share_of_scored_fine_questions(tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--n", "600", "--fine-fraction", "0.6",
                         "--text-only-fraction", "0"])
    scored = [r["question_type"] for r in json.loads((tmp_path / "data.json").read_text())]
    assert 0.54 < scored.count("fine") / len(scored) < 0.66
    assert all(0.15 < scored.count(t) / len(scored) < 0.25 for t in ("coarse", "medium"))


def test_splits_share_no_image_no_text_question_and_no_id(tmp_path):
    """Train, validation and test drawn with the same seed: their images (pixels), their text
    questions and their record ids are disjoint, and each id names its split."""
    from PIL import Image

    images, questions, ids = {}, {}, {}
    for split, n in (("train", 300), ("validation", 150), ("test", 150)):
        out = tmp_path / split
        make_synthetic.main(["--out", str(out), "--n", str(n), "--split", split, "--seed", "0",
                             "--text-only-fraction", "0.4"])
        records = json.loads((out / "data.json").read_text())
        assert all(r["id"].startswith(f"{split}-") for r in records)
        ids[split] = {r["id"] for r in records}
        questions[split] = {r["conversations"][0]["value"] for r in records if "image" not in r}
        images[split] = set()
        for r in records:
            if "image" in r:
                assert r["image"].startswith(f"images/{split}-")
                with Image.open(out / r["image"]) as image:
                    images[split].add(image.tobytes())
        assert len(questions[split]) > 10 and len(images[split]) > 50
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not images[a] & images[b] and not questions[a] & questions[b] and not ids[a] & ids[b], (a, b)


def test_every_text_question_and_scene_belongs_to_one_split_owning_its_share():
    """split_of partitions the whole text-question space (all sums and differences of 0-20, the
    word facts); each split owns roughly its share of it, so none is starved."""
    space = {q for q, _ in make_synthetic.WORD_FACTS}
    space |= {f"What is {a} plus {b}?" for a in range(21) for b in range(21)}
    space |= {f"What is {a} minus {b}?" for a in range(21) for b in range(a + 1)}
    owners = [make_synthetic.split_of(q) for q in space]
    shares = {split: owners.count(split) / len(owners) for split in make_synthetic.SPLITS}
    assert 0.75 < shares["train"] < 0.85 and 0.07 < shares["validation"] < 0.13 and 0.07 < shares["test"] < 0.13
    rng = random.Random(0)
    scene = make_synthetic.scene_in_split(rng, 64, "test")
    assert make_synthetic.split_of(json.dumps(scene, sort_keys=True)) == "test"
