"""tools/build_shards on data as it is published (pipeline/data/sources.py, schemas.py): each
schema from parquet with images as bytes and as paths, single- and multi-image and text-only rows,
gives the shards of the same data as LLaVA JSON plus image files; the other inputs (a folder, a
glob, save_to_disk, a hub name from the cache) read the same rows; bad rows are skipped by named
reason; data no schema explains stops the build, naming it."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from tools import build_shards, make_synthetic

IMAGE = "<image>"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may download: datasets and the hub client offline, here and in subprocesses."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(root, records): 40 synthetic LLaVA records (single-image, two-image, text-only, multi-turn)
    with their images under root, and their JSON as root/data.json, the reference input. Two-image
    prompts are written "<image>\\n<image>\\nQuestion", as the Cauldron's images come first."""
    root = tmp_path_factory.mktemp("scenes")
    make_synthetic.main(["--out", str(root), "--n", "40", "--seed", "5", "--multi-image-fraction", "0.3",
                         "--text-only-fraction", "0.2", "--multi-turn-fraction", "0.3"])
    records = json.loads((root / "data.json").read_text())
    for record in records:
        first = record["conversations"][0]
        first["value"] = re.sub(r"Image \d: <image>\n", "<image>\n", first["value"])
    (root / "data.json").write_text(json.dumps(records))
    kinds = {type(r.get("image")).__name__ for r in records}
    assert kinds == {"str", "list", "NoneType"}
    return root, records


@pytest.fixture(scope="module")
def reference_shards(scenes, tmp_path_factory):
    """The scenes' shards from their LLaVA JSON and image files, 8 rows a slice."""
    root, _ = scenes
    out = tmp_path_factory.mktemp("reference")
    build_shards.build(str(root / "data.json"), str(root), str(out), samples_per_shard=8)
    return out


def image_value(root, path, embedded):
    """A row's image: a datasets Image struct with the bytes (and the path as its name), or the path."""
    return {"bytes": (root / path).read_bytes(), "path": path} if embedded else path


def images_of(record):
    image = record.get("image", [])
    return [image] if isinstance(image, str) else image


def llava_rows(root, records, embedded):
    def images(value):
        return [image_value(root, p, embedded) for p in value] if isinstance(value, list) else \
            image_value(root, value, embedded)

    return [{**record, "image": images(record["image"]) if "image" in record else None} for record in records]


def cauldron_rows(root, records, embedded):
    """The Cauldron's form: images first, untagged texts of {user, assistant, source}."""
    rows = []
    for record in records:
        turns = record["conversations"]
        user = [t["value"] for t in turns[::2]]
        user[0] = user[0].replace(f"{IMAGE}\n", "")
        rows.append({"id": record["id"], "question_type": record["question_type"],
                     "images": [image_value(root, p, embedded) for p in images_of(record)],
                     "texts": [{"user": u, "assistant": t["value"], "source": "synthetic"}
                               for u, t in zip(user, turns[1::2])]})
    return rows


def messages_rows(root, records, embedded, typed):
    """The chat-messages form: string contents with <image> tags, or typed parts one per line."""
    rows = []
    for record in records:
        messages = []
        for turn in record["conversations"]:
            content = turn["value"]
            if typed:
                content = [{"type": "image"} if line == IMAGE else {"type": "text", "text": line}
                           for line in content.split("\n")]
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
        rows.append({"id": record["id"], "question_type": record["question_type"], "messages": messages,
                     "images": [image_value(root, p, embedded) for p in images_of(record)]})
    return rows


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # row groups that cut slices
    return path


def assert_same_shards(out, expected):
    """Every shard and the manifest's counts equal the reference build's, byte for byte."""
    names = sorted(p.name for p in expected.glob("shard-*.tar"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == names and names
    for name in names:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    got, want = (json.loads((folder / "manifest.json").read_text()) for folder in (out, expected))
    for key in ("shards", "total_samples", "total_records", "skipped", "repeated_ids"):
        assert got[key] == want[key], key


@pytest.mark.parametrize("schema, embedded", [(s, e) for s in ("llava", "cauldron", "messages", "messages_typed")
                                              for e in (True, False)])
def test_each_schema_from_parquet_gives_the_shards_of_llava_json(scenes, reference_shards, tmp_path, schema, embedded):
    root, records = scenes
    if schema == "llava":
        # A parquet column holds one type: single images in one file, lists in another, read as one table.
        single = [r for r in records if not isinstance(r.get("image"), list)]
        multi = [r for r in records if isinstance(r.get("image"), list)]
        write_parquet(tmp_path / "data" / "a.parquet", llava_rows(root, single, embedded))
        write_parquet(tmp_path / "data" / "b.parquet", llava_rows(root, multi, embedded))
        (root / "ordered.json").write_text(json.dumps(single + multi))
        expected = tmp_path / "expected"
        build_shards.build(str(root / "ordered.json"), str(root), str(expected), samples_per_shard=8)
    else:
        rows = (cauldron_rows(root, records, embedded) if schema == "cauldron"
                else messages_rows(root, records, embedded, typed=schema == "messages_typed"))
        write_parquet(tmp_path / "data" / "train-00000.parquet", rows)
        expected = reference_shards
    manifest = build_shards.build(str(tmp_path / "data"), None if embedded else str(root), str(tmp_path / "out"),
                                  samples_per_shard=8)
    assert manifest["schema"] == schema.removesuffix("_typed") and manifest["total_samples"] == len(records)
    assert_same_shards(tmp_path / "out", expected)


def test_every_input_form_reads_the_same_rows(scenes, reference_shards, tmp_path, monkeypatch):
    """A parquet file, a glob, a datasets Dataset with Image features written as parquet, its
    save_to_disk folder, a DatasetDict's split, and a hub name resolved from the local cache
    offline all give the reference shards."""
    import datasets
    import huggingface_hub
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    root, records = scenes
    # Offline, whenever datasets was first imported, and with a cache of our own.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    rows = cauldron_rows(root, records, embedded=True)
    features = datasets.Features({"id": datasets.Value("string"), "question_type": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({k: datasets.Value("string")
                                                          for k in ("user", "assistant", "source")})})
    parquet = str(tmp_path / "parts" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows, features=features).to_parquet(parquet)
    dataset = datasets.Dataset.from_parquet(parquet)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    # The cache layout load_dataset("owner/name") reads offline: what a download left there.
    builder = Parquet(
        dataset_name="tiny", config_name="default", hash="0123abcd", cache_dir=str(tmp_path / "hf" / "datasets"),
        data_files=DataFilesDict.from_patterns(
            {"train": [str(tmp_path / "parts" / "train-00000-of-00001.parquet")]}))
    builder.download_and_prepare()
    prepared = next((tmp_path / "hf" / "datasets" / "tiny").glob("default*"))
    cached = tmp_path / "hf" / "datasets" / "owner___tiny" / "default"
    cached.parent.mkdir()
    prepared.rename(cached)
    inputs = {"file": [str(tmp_path / "parts" / "train-00000-of-00001.parquet")],
              "glob": [str(tmp_path / "parts" / "*.parquet")],
              "saved": [str(tmp_path / "saved")],
              "saved_dict": [str(tmp_path / "saved_dict"), "--split", "validation"],
              "hub": ["owner/tiny"]}
    for name, args in inputs.items():
        build_shards.main(["--input", *args, "--out", str(tmp_path / name), "--samples-per-shard", "8"])
        if name in ("file", "glob", "hub"):
            assert_same_shards(tmp_path / name, reference_shards)
        else:  # save_to_disk keeps an embedded image's file name, not its folder
            assert samples(tmp_path / name) == samples(reference_shards, basenames=True)
    with pytest.raises(SystemExit, match="saved_dict: no split 'train' \\(splits: \\['validation'\\]\\)"):
        build_shards.main(["--input", str(tmp_path / "saved_dict"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="owner/missing: not a JSON, parquet or save_to_disk input"):
        build_shards.main(["--input", "owner/missing", "--out", str(tmp_path / "x")])


def samples(folder, basenames=False):
    """Every sample of a shard folder, its record's image names reduced to file names if asked."""
    out = []
    for sample in wds.WebDataset(sorted(str(p) for p in folder.glob("shard-*.tar")), shardshuffle=False):
        record = json.loads(sample.pop("json"))
        if basenames and "image" in record:
            image = record["image"]
            record["image"] = (os.path.basename(image) if isinstance(image, str)
                               else [os.path.basename(i) for i in image])
        out.append((record, {k: v for k, v in sample.items() if not k.startswith("__")}, sample["__key__"]))
    return out


def test_embedded_images_without_a_name_are_named_by_their_format(scenes, tmp_path):
    root, records = scenes
    record = next(r for r in records if isinstance(r.get("image"), list))
    jpeg = io.BytesIO()
    Image.open(root / record["image"][1]).convert("RGB").save(jpeg, "JPEG")
    row = {"id": "x", "conversations": record["conversations"],
           "image": [{"bytes": (root / record["image"][0]).read_bytes(), "path": None},
                     {"bytes": jpeg.getvalue(), "path": None}]}
    write_parquet(tmp_path / "one.parquet", [row])
    build_shards.build(str(tmp_path / "one.parquet"), None, str(tmp_path / "out"))
    (sample,) = wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)
    assert json.loads(sample["json"])["image"] == ["embedded-0.png", "embedded-1.jpg"]
    assert sample["1.jpg"] == jpeg.getvalue()


def test_bad_rows_of_each_kind_are_skipped_by_named_reason(scenes, tmp_path):
    root, records = scenes
    path = next(r["image"] for r in records if isinstance(r.get("image"), str))
    photo = io.BytesIO()
    Image.open(root / path).convert("RGB").resize((256, 256)).save(photo, "JPEG")
    good = root.joinpath(path).read_bytes()

    def row(i, images, text=f"{IMAGE}\nWhat colour?", videos=None):
        return {"id": f"bad-{i}", "images": [{"bytes": data, "path": name} for data, name in images], "videos": videos,
                "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}]}
    rows = [row(0, [(None, path)]), row(1, [(good, None)]),
            row(2, [(None, "images/absent.png")]), row(3, [(b"\xff\xd8 not a jpeg", None)]),  # missing_image
            row(4, [(photo.getvalue()[:-100], None)]),                                       # (truncated)
            row(5, [(None, "../" + root.name + "/" + path)]), row(6, [(None, str(root / path))]),  # outside root
            row(7, [(None, path)], text="What colour?"), row(8, [(None, path)] * 2),          # tag mismatch
            row(9, [], videos=["clip.mp4"])]                                                  # video
    write_parquet(tmp_path / "rows.parquet", rows)
    manifest = build_shards.build(str(tmp_path / "rows.parquet"), str(root), str(tmp_path / "out"))
    assert manifest["total_samples"] == 2
    assert manifest["skipped"] == {"missing_image": 3, "image_outside_root": 2, "image_tag_mismatch": 2,
                                   "malformed_conversation": 0, "video": 1, "system_message": 0}
    assert manifest["skipped_examples"]["image_outside_root"] == ["bad-5", "bad-6"]
    assert manifest["skipped_examples"]["missing_image"] == ["bad-2", "bad-3", "bad-4"]
    kept = build_shards.build(str(tmp_path / "rows.parquet"), str(root), str(tmp_path / "allowed"),
                              allow_outside_root=True)
    assert kept["total_samples"] == 4 and kept["skipped"]["image_outside_root"] == 0

    # Typed and string contents of other shapes, as JSON Lines (LLaMA-Factory's form).
    answer = {"role": "assistant", "content": "red"}
    parts = [{"type": "image", "image": path}, {"type": "text", "text": "What colour?"}]
    lines = [{"id": "ok", "messages": [{"role": "user", "content": parts}, answer]},
             {"id": "system", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}, answer]},
             {"id": "video", "messages": [{"role": "user", "content": [{"type": "video"}]}, answer]},
             {"id": "blank", "messages": [{"role": "user", "content": " "}, answer]},
             {"id": "starts_with_answer", "messages": [answer, {"role": "user", "content": "Hi"}]},
             {"id": "image_part_without_image", "messages": [{"role": "user", "content": [{"type": "image"}]}, answer]},
             {"id": "unplaced_image", "images": [path], "messages": [{"role": "user", "content": [
                 {"type": "text", "text": "Hi"}]}, answer]}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken\n")
    manifest = build_shards.build(str(tmp_path / "rows.jsonl"), str(root), str(tmp_path / "out_jsonl"))
    assert manifest["total_samples"] == 1 and manifest["schema"] == "messages"
    assert {k: v for k, v in manifest["skipped_examples"].items()} == {
        "system_message": ["system"], "video": ["video"], "malformed_conversation": ["blank", "starts_with_answer",
                                                                                    "row-7"],
        "image_tag_mismatch": ["image_part_without_image", "unplaced_image"]}


@pytest.mark.parametrize("rows, args, error", [
    ([{"question": "q", "answer": "a"}], [], r"columns \['question', 'answer'\] hold none of the conversation columns"),
    ([{"texts": [], "messages": []}], [], "hold 2 of the conversation columns .* choose with --schema"),
    ([{"conversations": []}], ["--schema", "cauldron"],
     "--schema cauldron reads the column 'texts', which the input lacks"),
    ([{"messages": [{"role": "user", "content": [{"type": "audio", "text": None}]}]}], [],
     "row 0: message 0 has a content part of type 'audio'"),
    ([{"messages": [{"role": "tool", "content": "x"}]}], [], "row 0: message 0 has role 'tool'"),
    ([{"conversations": [{"from": "human", "value": "q", "weight": 0.5}]}], [], "row 0: turn 0 has key 'weight'"),
    ([{"conversations": [{"from": "human", "value": "q"}], "mask": b"\x00"}], [], "row 0: column 'mask' holds bytes"),
    ([{"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}], "image": "a.png"}], [],
     "row 0: image 'a.png' is a path; give the folder it is relative to with --image-root"),
])
def test_data_no_schema_explains_stops_the_build_naming_it(tmp_path, rows, args, error):
    write_parquet(tmp_path / "rows.parquet", rows)
    with pytest.raises(SystemExit, match=error):
        build_shards.main(["--input", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_killed_build_resumes_keeping_its_finished_slices(scenes, tmp_path):
    """SIGKILL while slice 2 waits on an image (a named pipe standing in for a stalled file
    system), then the same command again: the finished slices' files are not rewritten, the
    rest are built, and the folder equals an uninterrupted build's byte for byte."""
    root, records = scenes
    images = tmp_path / "root"
    shutil.copytree(root, images)
    stalled = images / images_of(next(r for r in records[16:24] if "image" in r))[0]  # slice 2 of 8-row slices
    stalled.unlink()
    os.mkfifo(stalled)
    out = tmp_path / "out"
    command = ["--input", str(root / "data.json"), "--image-root", str(images), "--samples-per-shard", "8"]
    build = subprocess.Popen([sys.executable, "-m", "tools.build_shards", *command, "--out", str(out)],
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = [out / "slices" / "000000.json", out / "slices" / "000001.json"]
    try:
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in finished) and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # slice 2 is then blocked on the pipe
        running = build.poll() is None
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
    assert running and all(p.exists() for p in finished), "the build did not stop at slice 2 after finishing 0 and 1"
    assert not (out / "manifest.json").exists() and not (out / "slices" / "000002.json").exists()
    kept = finished + [out / "shard-000000.tar", out / "shard-000001.tar"]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    stalled.unlink()
    shutil.copy(root / stalled.relative_to(images), stalled)

    result = build_shards.main(command + ["--out", str(out), "--workers", "2"])
    assert (result.slices_built, result.slices_kept) == (3, 2)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == before
    build_shards.main(command + ["--out", str(tmp_path / "uninterrupted")])
    assert tree(out) == tree(tmp_path / "uninterrupted")


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
