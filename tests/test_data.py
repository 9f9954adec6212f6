"""pipeline/data: the stream and the packed batches: splits, label masks, corruption, determinism,
shapes, bitwise resume, the image budget, image aspect, and the packer's figures on LLaVA-like
data. Epochs across the job and resumes at other layouts: tests/test_data_epochs.py."""

import copy
import json
import shutil
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoImageProcessor

from pipeline.data import TrainBatches, iter_samples
from pipeline.data.decode import Decoder, measure_text_tokens_per_tile
from pipeline.data.handover import SAMPLES_PER_HANDOVER, loader_items
from pipeline.data.mixture import load_mixture
from pipeline.data.stream import SampleStream
from pipeline.model.chat import IGNORE_INDEX, IMAGE_TOKEN, tokenize_record
from pipeline.model.images import image_pixel_values, set_image_aspect
from pipeline.run.config import DataConfig, load_config
from tests.distributed import REPO
from tools import build_shards, make_synthetic

N_SEQUENCE = [16, 64, 256, 144, 16, 256, 64, 64, 144, 16, 256, 64]


def batches(cfg, models, ns, rank=0, world_size=1, states=None):
    loader = TrainBatches(cfg, *models, rank=rank, world_size=world_size, states=states)
    return loader, [loader.next_batch(n) for n in ns]


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key != "stats":
                assert torch.equal(x[key], y[key]), key


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(shards="x", seq_len=0)
    with pytest.raises(ValueError, match="data.num_workers"):
        DataConfig(shards="x", num_workers=-1)
    with pytest.raises(ValueError, match="data.text_tokens_per_image"):
        DataConfig(shards="x", text_tokens_per_image="many")
    with pytest.raises(ValueError, match="data.image_aspect"):
        DataConfig(shards="x", image_aspect="crop")
    with pytest.raises(ValueError, match="shards not set"):
        load_mixture(DataConfig().shards)  # the default constructs (configs need that), but can't be used
    with pytest.raises(FileNotFoundError, match="shard-000008.tar"):
        load_mixture("/nonexistent/shard-{000008..000009}.tar")


def test_ranks_and_workers_split_without_resampling(synth, models):
    all_ids = [r["id"] for r in json.loads((synth / "raw" / "data.json").read_text())]
    seen = [[s["record"]["id"] for s in iter_samples(str(synth / "shards"), *models, rank=rank, world_size=2,
                                                      num_workers=2)] for rank in range(2)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_ids)
    assert len(seen[0]) + len(seen[1]) == len(all_ids)  # each sample exactly once


def test_labels_cover_exactly_the_assistant_replies(synth, models):
    tokenizer = models[0]
    for sample in iter_samples(str(synth / "shards"), *models):
        ids, labels = sample["input_ids"], sample["labels"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert all(labels[i] == ids[i] for i in trained)
        # Contiguous trained spans, one per reply, each exactly "<answer><|im_end|>".
        spans = []
        for i in trained:
            if spans and spans[-1][-1] == i - 1:
                spans[-1].append(i)
            else:
                spans.append([i])
        replies = [t["value"] for t in sample["record"]["conversations"][1::2]]
        assert [tokenizer.decode([ids[i] for i in span]) for span in spans] == [r + "<|im_end|>" for r in replies]
        # The prompt for generation is the sequence up to the last reply.
        assert ids[:len(sample["prompt_ids"])] == sample["prompt_ids"]
        assert sample["answer"] == replies[-1]


def write_corrupt_shards(synth, out):
    """0: truncated inside its 21st sample; 1: an undecodable image and a garbage json; 2: not a tar; 3, 4: good."""
    out.mkdir()
    good = sorted((synth / "shards").glob("shard-*.tar"))
    with tarfile.open(good[0]) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("000000020."))
    (out / "shard-000000.tar").write_bytes(good[0].read_bytes()[:cut.offset_data + cut.size // 2])
    samples = list(wds.WebDataset(str(good[1]), shardshuffle=False))
    image_sample = next(i for i, s in enumerate(samples) if "png" in s)
    samples[image_sample]["png"] = b"\x89PNG garbage"
    samples[image_sample + 1]["json"] = b"{not json"
    with wds.TarWriter(str(out / "shard-000001.tar")) as writer:
        for s in samples:
            writer.write({k: v for k, v in s.items() if k not in ("__url__", "__local_path__")})
    (out / "shard-000002.tar").write_bytes(b"garbage " * 1000)
    for i, path in enumerate(good[2:4], 3):
        shutil.copy(path, out / f"shard-{i:06d}.tar")
    return f"{out}/shard-{{000000..000004}}.tar", [
        samples[image_sample]["__key__"],
        samples[image_sample + 1]["__key__"],
    ]


def test_corrupt_shards_are_skipped_counted_and_the_stream_goes_on(synth, models, tmp_path, caplog):
    pattern, bad_keys = write_corrupt_shards(synth, tmp_path / "corrupt")
    mixture = load_mixture(pattern)
    assert "shard-000002.tar holds no readable sample; left out" in caplog.text  # not a tar: named, not read
    items = list(SampleStream(mixture, Decoder(*models), endless=False).items())
    samples = [i for i in items if i["kind"] == "sample"]
    skips = [i for i in items if i["kind"] == "skip"]
    assert all(s["reason"] == "corrupt" for s in skips)
    assert [s["key"] for s in skips if "shard-000001.tar" in s["shard"]] == bad_keys
    by_shard = {n: sum(f"shard-00000{n}.tar" in s["shard"] for s in samples) for n in range(5)}
    assert by_shard[1] == 38 and by_shard[2] == 0 and by_shard[3] == by_shard[4] == 40  # it went on past all
    assert by_shard[0] == 20  # the truncated shard's complete samples come through
    # the sample the truncation cut is a skip too: every planned sample is accounted for
    assert len(items) == len(samples) + len(skips) == sum(mixture.sources[0].sizes)
    assert [s["key"] for s in skips if "shard-000000.tar" in s["shard"]] == [None]
    assert "shard-000000.tar unreadable from sample" in caplog.text

    cfg = DataConfig(shards=pattern, seq_len=512, num_workers=2, shuffle_buffer=8)
    _, out = batches(cfg, models, [64] * 30)
    assert out[-1]["stats"]["total_skipped_corrupt"] >= 3  # 3 an epoch
    assert all(b["stats"]["num_samples"] > 0 for b in out)


def test_stream_is_deterministic_and_ranks_differ(synth, models):
    cfg = DataConfig(shards=str(synth / "shards"), seq_len=512, num_workers=2, shuffle_buffer=16)
    _, first = batches(cfg, models, N_SEQUENCE[:6])
    _, again = batches(cfg, models, N_SEQUENCE[:6])
    assert_same_batches(first, again)
    _, other_rank = batches(cfg, models, N_SEQUENCE[:6], rank=1, world_size=2)
    _, rank0 = batches(cfg, models, N_SEQUENCE[:6], rank=0, world_size=2)
    assert not any(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rank0, other_rank))
    _, other_seed = batches(DataConfig(**{**cfg.__dict__, "seed": 1}), models, N_SEQUENCE[:6])
    assert not torch.equal(first[0]["input_ids"], other_seed[0]["input_ids"])


def test_shapes_match_across_ranks_for_each_n(synth, models):
    cfg = DataConfig(shards=str(synth / "shards"), seq_len=640, rows_per_batch=2, num_workers=1)
    ns = [16, 64, 256, 256, 64, 16]
    loader, rank0 = batches(cfg, models, ns, rank=0, world_size=2)
    _, rank1 = batches(cfg, models, ns, rank=1, world_size=2)
    for n, a, b in zip(ns, rank0, rank1):
        for key in ["input_ids", "labels", "position_ids", "pixel_values", "image_mask"]:
            assert a[key].shape == b[key].shape, (n, key)
        assert a["pixel_values"].shape == (loader.tile_budget(n), 3, 64, 64)
        assert a["input_ids"].shape == (2, 640)


def test_batch_layout(synth, models):
    tokenizer = models[0]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = DataConfig(shards=str(synth / "shards"), seq_len=512, rows_per_batch=2, num_workers=0, shuffle_buffer=0)
    _, out = batches(cfg, models, [16, 64, 144])
    for n, batch in zip([16, 64, 144], out):
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        # Every image has exactly n slots, and as many real images as slot groups.
        assert int((ids == image_id).sum()) == n * int(batch["image_mask"].sum()) == n * batch["stats"]["num_images"]
        assert batch["image_mask"].tolist() == sorted(batch["image_mask"].tolist(), reverse=True)
        assert (batch["pixel_values"][~batch["image_mask"]] == 0).all()
        runs = 0
        for row in range(2):
            starts = (pos[row] == 0).nonzero().flatten().tolist()
            assert starts[0] == 0
            for a, b in zip(starts, starts[1:] + [cfg.seq_len]):
                assert pos[row, a:b].tolist() == list(range(b - a))  # positions count up within a run
            pad_start = cfg.seq_len - int((ids[row] == tokenizer.pad_token_id).flip(0).cumprod(0).sum())
            assert (labels[row, pad_start:] == IGNORE_INDEX).all()
            # One run per packed sample, plus the padding tail as a single run of its own.
            runs += len(starts) - (pad_start < cfg.seq_len)
            assert pad_start == cfg.seq_len or pad_start in starts
        assert runs == batch["stats"]["num_samples"]
        assert batch["stats"]["real_tokens"] + batch["stats"]["pad_tokens"] == ids.numel()


def test_overlong_samples_are_truncated_or_dropped(synth, models):
    cfg = DataConfig(shards=str(synth / "shards"), seq_len=96, num_workers=0, shuffle_buffer=0, pack_window=8)
    loader = TrainBatches(cfg, *models)
    # At N=256 no image fits in 96 tokens: image samples are dropped, only text-only ones pack.
    for _ in range(3):
        batch = loader.next_batch(256)
        assert batch["stats"]["num_images"] == 0
    assert batch["stats"]["total_dropped"] > 0
    # At N=64 an image sample (~60 text tokens) overflows after its slots: truncated to one full row.
    truncated_before = batch["stats"]["total_truncated"]
    for _ in range(6):
        batch = loader.next_batch(64)
    assert batch["stats"]["total_truncated"] > truncated_before


def resume_config(synth):
    """Three shards (40, 40, 20), 100 samples, over two workers: they read 50 each per epoch."""
    return DataConfig(shards=str(synth / "shards" / "shard-{000005..000007}.tar"), seq_len=512, num_workers=2,
                      shuffle_buffer=16)


def first_state_where(loader, ns, wanted):
    """(steps taken, state): the loader's state after the first step of ns at which it is `wanted`,
    through JSON as a checkpoint keeps it."""
    for cut, n in enumerate(ns, 1):
        loader.next_batch(n)
        state = json.loads(json.dumps(loader.state_dict()))
        if wanted(state):
            return cut, state
    raise AssertionError("no step gave the wanted state")


def test_resume_gives_identical_batches(synth, models):
    # The state is taken at the first step where a sample of an older epoch still waits in the
    # window while a worker reads a newer one: the replay then restarts the workers at different
    # epochs, the hard case.
    cfg = resume_config(synth)
    ns = N_SEQUENCE * 5
    loader = TrainBatches(cfg, *models)
    cut, state = first_state_where(loader, ns, lambda state: len({w["restart"][0] for w in state["workers"]}) > 1)
    assert cut < len(ns) - 10, "no step left the workers restarting at different epochs"
    assert state["window"] and state["pulled"] > len(state["window"])
    tail = [loader.next_batch(n) for n in ns[cut:]]
    waiting = {s["epoch"] for s in loader.window} | {e for b in tail for *_, e in b["stats"]["samples"]}
    assert min(waiting) < max(waiting)  # the tail packs samples of more than one epoch

    _, resumed = batches(cfg, models, ns[cut:], states=[state])
    assert_same_batches(tail, resumed)
    assert [b["stats"] for b in resumed] == [b["stats"] for b in tail]
    with pytest.raises(ValueError, match="different seed"):
        TrainBatches(DataConfig(**{**cfg.__dict__, "seed": 1}), *models, states=[state])


def test_resume_mid_handover_gives_identical_batches(synth, models):
    # Workers hand items over in groups (pipeline/data/handover.py). Each worker reads 50 samples
    # an epoch, so epoch 1 begins at count 50, inside a group: a state taken when every worker
    # restarts there must replay the loader's turns from that group's start.
    cfg = resume_config(synth)
    ns = N_SEQUENCE * 5
    loader = TrainBatches(cfg, *models)
    cut, state = first_state_where(loader, ns,
                                   lambda state: min(w["restart"][1] for w in state["workers"]) % SAMPLES_PER_HANDOVER)
    assert cut < len(ns) - 5, "no step left every worker restarting inside a handover"
    tail = [loader.next_batch(n) for n in ns[cut:]]
    _, resumed = batches(cfg, models, ns[cut:], states=[state])
    assert_same_batches(tail, resumed)


def test_handovers_carry_each_items_own_pixels(synth, models):
    items = list(SampleStream(load_mixture(str(synth / "shards" / "shard-000005.tar")), Decoder(*models),
                              endless=False).items())
    arrived = list(loader_items(SampleStream(load_mixture(str(synth / "shards" / "shard-000005.tar")),
                                             Decoder(*models), endless=False), num_workers=1))
    assert [i["key"] for i in arrived] == [i["key"] for i in items]
    assert any(i.get("pixel_values") is None for i in items if i["kind"] == "sample")  # text-only ones too
    for before, after in zip(items, arrived):
        if before.get("pixel_values") is None:
            assert after.get("pixel_values") is None
        else:
            assert torch.equal(before["pixel_values"], after["pixel_values"])
            assert after["pixel_values"].untyped_storage().nbytes() == after["pixel_values"].nbytes  # its own copy


def test_a_sample_that_never_fits_is_an_error_not_a_hang(models, tmp_path):
    make_synthetic.main(["--out", str(tmp_path / "raw"), "--n", "40", "--text-only-fraction", "0"])
    build_shards.build(str(tmp_path / "raw" / "data.json"), str(tmp_path / "raw"), str(tmp_path / "shards"))
    loader = TrainBatches(DataConfig(shards=str(tmp_path / "shards"), seq_len=96, num_workers=0), *models)
    with pytest.raises(ValueError, match=r"data.seq_len=96 at N=256"):
        loader.next_batch(256)  # every sample has an image, and 256 slots never fit in 96 tokens


def test_auto_text_tokens_per_image_is_measured_on_the_data(synth, models):
    tokenizer = models[0]
    records = json.loads((synth / "raw" / "data.json").read_text())
    encoded = [tokenize_record(r, tokenizer, int("image" in r))[0] for r in records]
    images = sum("image" in r for r in records)
    exact = (sum(len(ids) for ids in encoded) - images) / images
    # 8 shards of at most 40 samples: reading 64 of each reads them all.
    assert measure_text_tokens_per_tile(load_mixture(str(synth / "shards")), tokenizer) == pytest.approx(exact)
    cfg = DataConfig(shards=str(synth / "shards"), seq_len=512, rows_per_batch=2, num_workers=1)
    budgets = [[TrainBatches(cfg, *models, rank=r, world_size=2).tile_budget(n) for n in (16, 64, 144)]
               for r in range(2)]
    assert budgets[0] == budgets[1]  # the same on every rank, so shapes agree
    assert budgets[0] == [-(-1024 // (n + exact)) for n in (16, 64, 144)]


def test_image_aspect_pads_to_a_square_in_the_mean_colour_or_resizes(models, tmp_path):
    processor = models[1]
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded, resized = (image_pixel_values([wide], processor, aspect)[0] for aspect in ("pad", "resize"))
    background = torch.tensor([int(255 * m) for m in processor.image_mean], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(padded[:, :15, :], background.expand(3, 15, 64))  # top band: the mean colour
    assert padded[:, 32, 32].tolist() == [255, 0, 0]  # the red image sits in the middle
    assert (resized[0] == 255).all() and (resized[1] == 0).all()  # stretched over the whole square
    # The choice travels with a saved image processor; without a record, resize (what older folders did).
    assert torch.equal(image_pixel_values([wide], processor), resized.unsqueeze(0))
    recording = copy.deepcopy(processor)
    set_image_aspect(recording, "pad")
    recording.save_pretrained(tmp_path)
    assert torch.equal(image_pixel_values([wide], AutoImageProcessor.from_pretrained(tmp_path)), padded.unsqueeze(0))


@pytest.fixture(scope="module")
def llava_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_like")
    make_synthetic.main(["--out", str(root / "raw"), "--n", "1000", "--llava-like"])
    build_shards.build(str(root / "raw" / "data.json"), str(root / "raw"), str(root / "shards"), samples_per_shard=100)
    return root / "shards"


def packing_figures(loader, n, count):
    out = [loader.next_batch(n)["stats"] for _ in range(count)]
    pad = sum(s["pad_tokens"] for s in out) / sum(s["pad_tokens"] + s["real_tokens"] for s in out)
    dummy = 1 - sum(s["num_tiles"] for s in out) / sum(s["tile_budget"] for s in out)
    assert out[-1]["total_samples_packed"] == sum(s["num_samples"] for s in out)
    return pad, dummy, out[-1]["total_dropped"]


@pytest.mark.parametrize("stage", ["stage1_align", "stage2_finetune"])
@pytest.mark.parametrize("n", [64, 144, 256])
def test_llava_like_batches_fill_rows_and_image_slots(llava_like, models, stage, n):
    """With the shipped stage configs' row shapes and the image budget measured on the data,
    nearly every token is real and nearly every image slot holds a real image: under 3% dummies,
    docs/data.md's figure (these 12 batches of 1000 records measured at most 2.2%;
    bench/loader_results.md, 200 batches of 3000, at most 1.4%)."""
    shipped = load_config(REPO / "configs" / f"{stage}.yaml").data
    cfg = DataConfig(shards=str(llava_like), seq_len=shipped.seq_len, rows_per_batch=shipped.rows_per_batch,
                     num_workers=1)
    pad, dummy, dropped = packing_figures(TrainBatches(cfg, *models), n, 12)
    assert pad < 0.02 and dummy < 0.03 and dropped == 0


@pytest.mark.parametrize("n", [16, 64, 144])
def test_synthetic_batches_pad_under_two_percent_with_defaults(synth, models, n):
    # (N=256 is left out: its image samples are 300-370 tokens, so whole samples fill at most
    # ~94% of 2048 in the long run. bench/loader.py reports that case.)
    pad, _, _ = packing_figures(TrainBatches(DataConfig(shards=str(synth / "shards"), num_workers=1), *models), n, 8)
    assert pad < 0.02
