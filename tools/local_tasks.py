"""Point lmms-eval's own tasks at local data: copy a task from the installed lmms-eval, changing
only where its data comes from and its name.

    python -m tools.local_tasks --out tasks pope=data/pope mme=data/mme
    python -m tools.local_tasks --out runs/demo/tasks --synthetic runs/demo/shards/test
    python -m lmms_eval --model tokenflex --tasks pope_local,mme_local --include_path tasks ...

TASK=DATASET: DATASET is a folder that datasets' save_to_disk wrote, holding the task's splits
(on a machine with network, for example:
`datasets.load_dataset("lmms-lab/POPE").save_to_disk("data/pope")`). The copy, OUT/TASK_local/,
keeps the task's folder: its utils.py, prompts, generation settings and metrics. Its YAML differs
in three keys only: dataset_path (DATASET), dataset_kwargs (load_from_disk: true) and task
(TASK_local, since lmms-eval prefers a built-in task to an --include_path one of the same name).

--synthetic SHARDS first writes datasets in the schemas of POPE, MME and SEED-Bench from the
synthetic scenes of held-out shards (tools.synthetic_tasks) to OUT/data, then copies pope, mme
and seedbench_ppl (SEED-Bench scored by log-likelihood) pointed at them; from the shards' clips
(tools.make_synthetic --video-fraction), datasets in MVBench's schema, and copies of its video
tasks mvbench_moving_direction, mvbench_moving_attribute and mvbench_action_count (docs/video.md).
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

SYNTHETIC = {"pope": "pope", "mme": "mme", "seedbench_ppl": "seedbench"}  # task: dataset of tools.synthetic_tasks
SYNTHETIC_VIDEO = {task: task for task in ("mvbench_moving_direction", "mvbench_moving_attribute",
                                           "mvbench_action_count")}
DATA_KEYS = ("task", "dataset_path", "dataset_kwargs")  # the keys a copy changes
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


def installed_task(task, task_index):
    """The YAML of one of the installed lmms-eval's tasks (task_index: a TaskManager's); ValueError
    for a group, tag or unknown name."""
    entry = task_index.get(task)
    if entry is None or entry["type"] != "task":
        raise ValueError(f"the installed lmms-eval has no task {task!r}" +
                         (f" (it is a {entry['type']}; name its tasks)" if entry else ""))
    return Path(entry["yaml_path"])


def local_task(task, dataset, out, task_index):
    """Copy `task` into OUT/<task>_local pointed at the saved dataset folder; returns the new name."""
    import datasets
    from lmms_eval.utils import load_yaml_config

    source = installed_task(task, task_index)
    config = load_yaml_config(str(source), mode="simple")
    dataset = Path(dataset).resolve()
    try:
        splits = set(datasets.load_from_disk(str(dataset)))
    except FileNotFoundError as error:
        raise ValueError(f"{task}={dataset}: not a folder written by datasets' save_to_disk ({error})") from None
    missing = [f"{key} {config[key]!r}" for key in SPLIT_KEYS if key in config and config[key] not in splits]
    if missing:
        raise ValueError(f"{task}={dataset}: the task reads {', '.join(missing)}, but the dataset's splits "
                         f"are {sorted(splits)}")
    name = f"{task}_local"
    folder = Path(out) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in source.parent.iterdir():
        if path == source:
            (folder / path.name).write_text(with_local_data(path.read_text(), name, dataset))
        elif path.is_file() and not (path.suffix == ".yaml" and defines_task(path)):
            shutil.copy(path, folder)  # utils.py, templates a YAML includes; the folder's other tasks stay out
    return name


def defines_task(path):
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(path), mode="simple")
    return isinstance(config, dict) and ("task" in config or "group" in config)


def with_local_data(text, name, dataset):
    """A task YAML's text with its DATA_KEYS (and their indented values) replaced; the rest kept as written."""
    kept, skipping = [], False
    for line in text.splitlines():
        top_key = re.match(r"(\w+)\s*:", line)
        if top_key:
            skipping = top_key.group(1) in DATA_KEYS
        elif line and not line[0].isspace() and not line.startswith("#"):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join([*kept, f"task: {name}", f"dataset_path: {dataset}", "dataset_kwargs:",
                      "  load_from_disk: true", ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="*", metavar="TASK=DATASET",
                        help="an lmms-eval task and the folder of its saved dataset")
    parser.add_argument("--out", required=True, type=Path, help="folder for the copies (lmms-eval's --include_path)")
    parser.add_argument("--synthetic", metavar="SHARDS",
                        help="held-out synthetic shards: build pope, mme and seedbench_ppl data from their scenes, "
                             "and mvbench's video tasks from their clips")
    parser.add_argument("--limit", type=int, help="with --synthetic: only the first K scenes and K clips")
    args = parser.parse_args(argv)
    pairs = [task.split("=", 1) for task in args.tasks]
    if any(len(pair) != 2 for pair in pairs) or not (pairs or args.synthetic):
        parser.error("give TASK=DATASET pairs, or --synthetic SHARDS")
    try:
        from lmms_eval.tasks import TaskManager
        from loguru import logger
    except ModuleNotFoundError as error:
        parser.error(f"{error}: install lmms-eval with `pip install --no-deps -r requirements-eval.txt`")
    logger.remove()  # lmms-eval's debug lines about every task folder it indexes
    logger.add(sys.stderr, level="WARNING")
    try:
        if args.synthetic:
            from tools.synthetic_tasks import write_datasets

            folders = write_datasets(args.synthetic, args.out / "data", args.limit)
            pairs += [(task, folders[kind]) for task, kind in {**SYNTHETIC, **SYNTHETIC_VIDEO}.items()
                      if kind in folders]
        task_index = TaskManager().task_index
        names = [local_task(task, dataset, args.out, task_index) for task, dataset in pairs]
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {', '.join(names)} to {args.out}; run them with\n"
          f"  python -m lmms_eval --model tokenflex --tasks {','.join(names)} --include_path {args.out} "
          f"--model_args pretrained=MODEL_FOLDER,num_vision_tokens=64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
