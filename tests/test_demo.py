"""tools/demo: its training runs chain as the configs say (stage 1, then stage 2 in two parts, the
fine question alone first), and the first part's data set asks nothing else."""

import json
from pathlib import Path

from pipeline.run.config import load_config
from tests.distributed import REPO
from tools import make_synthetic
from tools.demo import RUNS, SYNTHETIC, stage_command


def option(command, key):
    return next(arg.split("=", 1)[1] for arg in map(str, command) if arg.startswith(f"{key}="))


def test_each_run_starts_from_the_one_before_on_its_own_data_set():
    root, names = Path("/data"), list(RUNS)
    for before, name in zip(names, names[1:]):
        command = stage_command(name, root, root / name, 2)
        assert option(command, "model.init_from") == str(root / before / "final")
        assert option(command, "data.shards") == str(root / "shards" / RUNS[name][1])
    first = stage_command(names[0], root, root / names[0], 2)
    assert option(first, "model.vision_path") == str(root / "tiny" / "vision")
    assert option(first, "data.shards") == str(root / "shards" / "train")


def test_the_configs_defaults_chain_the_demos_runs_the_same_way():
    """Run by hand without the demo (pipeline.train CONFIG alone), each config reads runs/demo's
    data set and the folder of the run before, as tools.demo passes them."""
    names = list(RUNS)
    for before, name in zip(names, names[1:]):
        cfg = load_config(REPO / RUNS[name][0])
        assert cfg.model.init_from == f"runs/demo/{before}/final", name
        assert cfg.data.shards == f"runs/demo/shards/{RUNS[name][1]}", name
        assert cfg.train.output_dir == f"runs/demo/{name}", name
        assert cfg.train.stage == "finetune"


def test_the_first_part_of_stage_2_asks_only_the_fine_question_once_per_training_scene(tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--n", "40", *SYNTHETIC["train_fine"]])
    records = json.loads((tmp_path / "data.json").read_text())
    assert len(records) == 40 and all(r["question_type"] == "fine" for r in records)
    assert all(len(r["conversations"]) == 2 and r["conversations"][0]["value"].startswith("<image>\nWhat colour is "
                                                                                           "the left dot?")
               for r in records)
    assert all(r["id"].startswith("train-") for r in records)
