"""Epochs across the whole job, with the real loaders (several ranks emulated in one process):
every sample read as often as the mixture says, whatever the shard sizes; resumes at another
number of ranks or workers that continue the epoch; a stuck worker that ends the run by name.
The pure arithmetic behind them is tested in tests/test_data_plan.py."""

import collections
import copy
import json
import os
import subprocess
import sys
import tarfile

import pytest
import yaml

from pipeline.data import TrainBatches
from pipeline.data.handover import SAMPLES_PER_HANDOVER
from pipeline.data.mixture import load_mixture
from pipeline.data.plan import epoch_sequence
from pipeline.run.config import DataConfig
from tests.distributed import REPO
from tools import build_shards, make_synthetic
from tools.demo import cpu_training_env

BUFFER, WINDOW = 4, 4  # shuffle buffer and pack window of these tests


def uneven(synth):
    """Five shards of 40, 40, 40, 40 and 20 samples (180)."""
    return str(synth / "shards" / "shard-{000003..000007}.tar")


def sample_key(packed):
    """(shard, key) of a stats["samples"] entry."""
    return tuple(packed[-3:-1])


def shard_keys(shards):
    """(shard, key) of every sample, from the tar headers."""
    keys = set()
    for url in load_mixture(shards).sources[0].urls:
        with tarfile.open(url) as tar:
            keys |= {(os.path.basename(url), member.name.split(".")[0]) for member in tar}
    return keys


def step(loaders, n=64):
    """One training step of every rank: the samples each packed."""
    return [loader.next_batch(n)["stats"]["samples"] for loader in loaders]


def test_the_job_reads_every_sample_once_an_epoch_whatever_the_shard_sizes(synth, models):
    """2 ranks x 2 workers over shards of 40, 40, 40, 40 and 20: counted as the job consumes
    samples (not by epoch labels), after one and after two epochs' worth every sample has been
    consumed that often, give or take one, and no more samples are one short than can be out of
    order at that moment."""
    keys = shard_keys(uneven(synth))
    assert len(keys) == 180
    ranks, workers = 2, 2
    cfg = DataConfig(shards=uneven(synth), seq_len=512, num_workers=workers, shuffle_buffer=BUFFER, pack_window=WINDOW)
    loaders = [TrainBatches(cfg, *models, rank=rank, world_size=ranks) for rank in range(ranks)]
    consumed, per_rank = collections.Counter(), [0] * ranks
    for epochs in (1, 2):
        while sum(consumed.values()) < epochs * len(keys):
            for rank, samples in enumerate(step(loaders)):
                consumed.update(sample_key(s) for s in samples)
                per_rank[rank] += len(samples)
        assert set(consumed) <= keys
        off = collections.Counter(consumed[k] - epochs for k in keys)
        assert set(off) <= {-1, 0, 1}, off  # 3 takes in one epoch's worth, or 2 or none each epoch, are 2 off
        # One short: a sample of the last epoch not consumed yet, one of the next taken before it.
        # Out of order on each rank: its pack window, and per worker but one a handover group.
        # The loader takes SAMPLES_PER_HANDOVER items from each worker in turn, so one worker's
        # next epoch can come before another's last samples. Neither the workers' shuffle buffers
        # (emptied at each epoch's end) nor the handovers prefetched (the loader's order is fixed)
        # reorder the epochs. A rank that packed fewer samples than the other (drift) may be
        # behind by the difference.
        in_flight = ranks * (WINDOW + (workers - 1) * SAMPLES_PER_HANDOVER)
        drift = abs(per_rank[0] - per_rank[1])
        assert off[-1] <= in_flight + drift, (off, in_flight, drift)


def samples_past_epoch_0(packed):
    """How many samples were packed after the last one of epoch 0."""
    last = max((i for i, s in enumerate(packed) if s[-1] == 0), default=-1)
    return len(packed) - 1 - last


def resume_elsewhere(cfg, models, before, after, steps_before, past_the_end, n=64):
    """Run `steps_before` steps at layout `before` (ranks, workers), save every rank's state
    (through JSON, as a checkpoint keeps it), resume at layout `after` and run until `past_the_end`
    samples have been packed after the last one labelled epoch 0 (at most 100 steps). Returns the
    samples packed before the save and after it, and every rank's counters at the save and right
    after the resume."""
    (ranks, workers), (new_ranks, new_workers) = before, after
    loaders = [TrainBatches(DataConfig(**{**cfg.__dict__, "num_workers": workers}), *models, rank=r, world_size=ranks)
               for r in range(ranks)]
    before_save = [s for _ in range(steps_before) for samples in step(loaders, n) for s in samples]
    states = json.loads(json.dumps([loader.state_dict() for loader in loaders]))
    saved = [copy.deepcopy(loader.counters) for loader in loaders]
    del loaders
    resumed = [TrainBatches(DataConfig(**{**cfg.__dict__, "num_workers": new_workers}), *models, rank=r,
                            world_size=new_ranks, states=states) for r in range(new_ranks)]
    restored = [copy.deepcopy(loader.counters) for loader in resumed]
    after_resume = []
    for _ in range(100):
        after_resume += [s for samples in step(resumed, n) for s in samples]
        if samples_past_epoch_0(before_save + after_resume) >= past_the_end:
            break
    return before_save, after_resume, saved, restored


def summed(counters):
    total = collections.Counter()
    for c in counters:
        total.update({k: v for k, v in c.items() if not isinstance(v, dict)})
        total.update({f"{k}/{name}": n for k, v in c.items() if isinstance(v, dict) for name, n in v.items()})
    return total


@pytest.mark.parametrize("before, after", [((2, 2), (1, 3)), ((1, 1), (2, 2))])
def test_a_resume_at_another_layout_continues_the_epoch(synth, models, before, after):
    """Stopped mid-epoch (some of epoch 0 consumed, none of epoch 1) and resumed with other ranks
    and workers, then run on well past epoch 0's end (a third of an epoch more: beyond what the
    pack windows and handover groups hold): over the whole run, every sample of epoch 0 is consumed
    exactly once, none of them after that, and the counters carry the job's totals on."""
    keys = shard_keys(uneven(synth))
    cfg = DataConfig(shards=uneven(synth), seq_len=512, shuffle_buffer=8, pack_window=8)
    past_the_end = len(keys) // 3
    before_save, after_resume, saved, restored = resume_elsewhere(cfg, models, before, after, 20 // before[0],
                                                                  past_the_end)
    assert {s[-1] for s in before_save} == {0} and 0 < len(before_save) < len(keys)  # saved mid-epoch
    packed = before_save + after_resume
    first_epoch = collections.Counter(sample_key(s) for s in packed if s[-1] == 0)
    assert set(first_epoch) == keys and set(first_epoch.values()) == {1}
    assert samples_past_epoch_0(packed) >= past_the_end  # the run went on: no epoch-0 sample among its last ones
    assert summed(restored) == summed(saved) and summed(saved)["samples_packed"] > 0


def write_mixture(path, sources):
    path.write_text(yaml.safe_dump({"sources": sources}))
    return str(path)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A source of 3 samples: fewer than the 4 workers of 2 ranks x 2 workers."""
    root = tmp_path_factory.mktemp("tiny_source")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "3", "--seed", "9", "--text-only-fraction", "0"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"))
    return root / "shards"


def test_a_source_smaller_than_the_workers_is_read_exactly(synth, models, tiny_source, tmp_path):
    """Workers share an epoch by sample, not by shard: a 3-sample source in a mixture read by
    2 ranks x 2 workers comes exactly once an epoch (here twice, with repeat 2)."""
    shards = write_mixture(tmp_path / "mixture.yaml", [{"name": "uneven", "shards": uneven(synth), "repeat": 1},
                                                         {"name": "tiny", "shards": str(tiny_source), "repeat": 2}])
    cfg = DataConfig(shards=shards, seq_len=512, num_workers=2, shuffle_buffer=8, pack_window=8)
    loaders = [TrainBatches(cfg, *models, rank=rank, world_size=2) for rank in range(2)]
    packed = []
    for _ in range(100):  # until an epoch's worth labelled epoch 0 is packed: 180 + 2 x 3
        packed += [s for samples in step(loaders) for s in samples]
        if sum(s[-1] == 0 for s in packed) >= 186:
            break
    by_source = collections.Counter((s[0], sample_key(s)) for s in packed if s[-1] == 0)
    assert sorted(n for (source, _), n in by_source.items() if source == "tiny") == [2, 2, 2]
    assert {n for (source, _), n in by_source.items() if source == "uneven"} == {1}
    assert sum(source == "uneven" for source, _ in by_source) == 180


def test_an_epoch_smaller_than_ranks_times_workers_is_an_error(models, tiny_source):
    with pytest.raises(ValueError, match="3 samples an epoch, fewer than 2 ranks x 2 workers.*data.num_workers"):
        TrainBatches(DataConfig(shards=str(tiny_source), num_workers=2), *models, rank=0, world_size=2)


STUCK_SCRIPT = """
import sys
from transformers import AutoImageProcessor
from pipeline.model.chat import load_tokenizer
from pipeline.run.config import DataConfig
from pipeline.data import TrainBatches

models, shards = sys.argv[1:]
cfg = DataConfig(shards=shards, seq_len=512, num_workers=2, shuffle_buffer=0, pack_window=4, text_tokens_per_image=64,
                 read_timeout_s=3)
data = TrainBatches(cfg, load_tokenizer(models + "/qwen2"), AutoImageProcessor.from_pretrained(models + "/vision"))
data.next_batch(16)
"""


def test_a_stuck_worker_ends_the_run_naming_its_shard(synth, models, tiny_models, tmp_path):
    """A shard whose read blocks (a FIFO nobody writes): the run ends after data.read_timeout_s
    with an error naming the rank, the worker and the shard, and leaves no process behind."""
    folder = tmp_path / "stuck"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes((synth / "shards" / "shard-000003.tar").read_bytes())
    os.mkfifo(folder / "shard-000001.tar")
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar", "num_samples": 40},
                                                                 {"name": "shard-000001.tar", "num_samples": 40}]}))
    # Each worker reads one shard: the one the epoch's order puts second is the FIFO's reader.
    stuck_worker = [piece.shard for piece in epoch_sequence(load_mixture(str(folder)), 0, 0).pieces].index(1)
    result = subprocess.run([sys.executable, "-c", STUCK_SCRIPT, str(tiny_models), str(folder)], cwd=REPO,
                            env=cpu_training_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert (f"TimeoutError: rank 0: data loader worker {stuck_worker} delivered nothing for 3 s (data.read_timeout_s); "
            f"it was reading {folder / 'shard-000001.tar'}") in result.stderr
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes outlived the run: {left}"
