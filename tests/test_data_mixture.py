"""pipeline/data/mixture.py and tools/build_mixture.py: mixture files, their errors (each naming
the source), a single folder as a mixture of one, and a LLaVA-OneVision-style YAML, of JSON files or
of published parquet subsets, turned into a mixture that trains."""

import json
import os

import pytest
import webdataset as wds
import yaml

from pipeline.data import TrainBatches
from pipeline.data.mixture import load_mixture
from pipeline.run.config import DataConfig
from tools import build_mixture


def write(path, sources):
    path.write_text(yaml.safe_dump({"sources": sources}))
    return str(path)


def test_a_folder_is_a_mixture_of_one(synth):
    mixture = load_mixture(str(synth / "shards"))
    (source,) = mixture.sources
    assert (source.name, source.repeat, source.num_samples, len(source.urls)) == ("shards", 1.0, 300, 8)
    assert mixture.epoch_length() == 300 and mixture.mode == "repeat"


def test_sources_resolve_relative_to_the_mixture_file(synth, tmp_path):
    (tmp_path / "data").symlink_to(synth / "shards")
    mixture = load_mixture(
        write(
            tmp_path / "mix.yaml",
            [
                {"name": "a", "shards": "data", "repeat": 2},
                {"name": "b.v2", "shards": str(synth / "shards"), "repeat": 0.5},
            ],
        )
    )
    assert [s.name for s in mixture.sources] == ["a", "b.v2"] and mixture.takes() == [600, 150]
    manifest = mixture.manifest(seed=4)
    assert manifest["seed"] == 4 and manifest["epoch_samples"] == 750
    assert [(s["name"], s["samples"], s["repeat"], s["samples_per_epoch"]) for s in manifest["sources"]] == \
        [("a", 300, 2.0, 600), ("b.v2", 300, 0.5, 150)]


@pytest.mark.parametrize("source, error", [
    ({"name": "vqa", "shards": "missing", "repeat": 1}, "source 'vqa'.*missing not found"),
    ({"name": "vqa", "shards": "SHARDS", "weight": 0}, "source 'vqa': weight must be a number > 0, got 0"),
    ({"name": "vqa", "shards": "SHARDS", "weight": -2}, "source 'vqa': weight must be a number > 0, got -2"),
    ({"name": "vqa", "shards": "SHARDS", "repeat": 1, "weight": 1}, "source 'vqa': give exactly one of `repeat`"),
    ({"name": "vqa", "shards": "SHARDS"}, "source 'vqa': give exactly one of `repeat`"),
    ({"name": "vqa", "shards": "SHARDS", "repeats": 1}, "source 'vqa': unknown key 'repeats'"),
    ({"name": "v q a", "shards": "SHARDS", "repeat": 1}, "source 'v q a': needs a `name` of letters"),
    ({"shards": "SHARDS", "repeat": 1}, "source #2: needs a `name`"),
])
def test_mixture_errors_name_the_source(synth, tmp_path, source, error):
    source = {k: (str(synth / "shards") if v == "SHARDS" else v) for k, v in source.items()}
    path = write(tmp_path / "mix.yaml", [{"name": "ok", "shards": str(synth / "shards"), "repeat": 1}, source])
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        load_mixture(path)


def test_mixture_errors_for_the_whole_file(synth, tmp_path):
    shards = str(synth / "shards")
    with pytest.raises(ValueError, match="source 'b' has a weight while others have a repeat count"):
        load_mixture(write(tmp_path / "m1.yaml", [{"name": "a", "shards": shards, "repeat": 1},
                                                   {"name": "b", "shards": shards, "weight": 1}]))
    with pytest.raises(ValueError, match="source name 'a' is used more than once"):
        load_mixture(write(tmp_path / "m2.yaml", [{"name": "a", "shards": shards, "repeat": 1}] * 2))
    with pytest.raises(FileNotFoundError, match="mixture file .*absent.yaml not found"):
        load_mixture(str(tmp_path / "absent.yaml"))


def test_a_onevision_yaml_becomes_a_mixture_that_trains(synth, models, tmp_path, capsys):
    records = json.loads((synth / "raw" / "data.json").read_text())
    for name, part in [("llava", records[:120]), ("vqa", records[120:220]), ("ocr", records[220:])]:
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    (tmp_path / "ocr_dup").mkdir()
    (tmp_path / "ocr_dup" / "ocr.json").write_text(json.dumps(records[:10]))
    spec = {"datasets": [{"json_path": str(tmp_path / "llava.json"), "sampling_strategy": "all"},
                         {"json_path": str(tmp_path / "vqa.json"), "sampling_strategy": "first:25%"},
                         {"json_path": str(tmp_path / "ocr.json"), "sampling_strategy": "random:30"},
                         {"json_path": str(tmp_path / "ocr_dup" / "ocr.json"), "sampling_strategy": "end:3"}]}
    (tmp_path / "onevision.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "mix"
    build_mixture.main(["--yaml", str(tmp_path / "onevision.yaml"), "--image-root", str(synth / "raw"),
                        "--out", str(out), "--samples-per-shard", "16"])
    assert "train on it with data.shards=" in capsys.readouterr().out
    mixture = load_mixture(str(out / "mixture.yaml"))
    assert [(s.name, s.num_samples, s.repeat) for s in mixture.sources] == \
        [("llava", 120, 1.0), ("vqa", 25, 1.0), ("ocr", 30, 1.0), ("ocr-2", 3, 1.0)]

    def ids(name):
        urls = [str(out / name / s["name"]) for s in json.loads((out / name / "manifest.json").read_text())["shards"]]
        return [json.loads(s["json"])["id"] for s in wds.WebDataset(urls, shardshuffle=False)]

    assert ids("vqa") == [r["id"] for r in records[120:145]]  # the first 25% (ceil of 25)
    assert ids("ocr-2") == [r["id"] for r in records[7:10]]
    assert set(ids("ocr")) < {r["id"] for r in records[220:]}
    loader = TrainBatches(DataConfig(shards=str(out / "mixture.yaml"), seq_len=512, num_workers=1), *models)
    assert loader.next_batch(64)["stats"]["num_samples"] > 0

    spec["datasets"][1]["sampling_strategy"] = "sample:5"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="dataset .*vqa.json: sampling_strategy 'sample:5' is not all, first:N"):
        build_mixture.main(["--yaml", str(tmp_path / "bad.yaml"), "--image-root", str(synth / "raw"),
                            "--out", str(tmp_path / "bad")])


def test_published_parquet_subsets_become_a_mixture_that_trains_on_two_ranks(synth, tiny_models, tmp_path):
    """A local copy of a LLaVA-OneVision-Data subset (a folder named as the hub's, parquet with
    the images as datasets Image structs, text-only rows with none) and of a Cauldron-style one
    (images lists, texts of user/assistant turns), listed by `path` in a OneVision YAML: no image
    root, a mixture of both, and stage 1 trains on it with torchrun on 2 CPU ranks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.distributed import metrics, run_training, stage1_overrides

    records = json.loads((synth / "raw" / "data.json").read_text())

    def image(path):
        return {"bytes": (synth / "raw" / path).read_bytes(), "path": os.path.basename(path)}
    onevision = [{"id": r["id"], "image": image(r["image"]) if "image" in r else None,
                  "conversations": r["conversations"], "data_source": "synthetic"} for r in records[:120]]
    cauldron = [{"images": [image(r["image"])] if "image" in r else [],
                 "texts": [{"user": q["value"].replace("<image>\n", ""), "assistant": a["value"], "source": "synthetic"}
                           for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]} for r in records[120:]]
    for folder, rows in [("LLaVA-OneVision-Data/aokvqa(cauldron,llava_format)", onevision),
                         ("the_cauldron/ai2d", cauldron)]:
        (tmp_path / folder).mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist(rows), tmp_path / folder / "train-00000-of-00001.parquet", row_group_size=50
        )
    spec = {"datasets": [{"path": str(tmp_path / "LLaVA-OneVision-Data" / "aokvqa(cauldron,llava_format)")},
                         {"path": str(tmp_path / "the_cauldron" / "ai2d"), "sampling_strategy": "first:50%"}]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "mix"
    build_mixture.main(["--yaml", str(tmp_path / "data.yaml"), "--out", str(out), "--samples-per-shard", "16"])
    mixture = load_mixture(str(out / "mixture.yaml"))
    assert [(s.name, s.num_samples) for s in mixture.sources] == [("aokvqa_cauldron_llava_format_", 120), ("ai2d", 90)]
    manifests = [json.loads((out / s.name / "manifest.json").read_text()) for s in mixture.sources]
    assert [m["schema"] for m in manifests] == ["llava", "cauldron"]
    first = next(iter(wds.WebDataset(str(out / "ai2d" / "shard-000000.tar"), shardshuffle=False)))
    assert json.loads(first["json"])["conversations"][0]["value"].startswith("<image>\n")

    run = tmp_path / "run"
    result = run_training("tiny_cpu_stage1.yaml", run, *stage1_overrides(tiny_models, out / "mixture.yaml"),
                          "train.max_steps=3", "train.save_every=3", "train.export_final=false")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = metrics(run)
    assert [m["step"] for m in logged] == [1, 2, 3]
    consumed = logged[-1]
    assert consumed["samples_total/ai2d"] > 0 and consumed["samples_total/aokvqa_cauldron_llava_format_"] > 0
