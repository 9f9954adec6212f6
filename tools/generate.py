r"""Answer one prompt (with no, one or several images, or a video clip) from a model folder, at one or
several N.

    python -m tools.generate runs/stage2/final --image scene.png --prompt "What colour is the background?" --tokens 64
    python -m tools.generate runs/stage2/final --image scene.png --prompt "..." --tokens 16,64,256
    python -m tools.generate runs/stage2/final --image a.png --image b.png --prompt "Same colour?" --tiles 4
    python -m tools.generate runs/stage2/final --video clip.mp4 --prompt "Which way did it move?" \
        --frames 8,32 --frame-tokens 16,64

Each --image adds an image marker (and a newline) before the prompt, in the order given; --video
adds one for the clip after them. --tiles: at most this many tiles per image
(pipeline/model/tiles.py; default: what the folder records; several images take at most its
multi-image limit each). --frames: at most this many frames sampled from the clip (uniformly,
pipeline/model/video.py; default: what the folder records); --frame-tokens: tokens per frame M
(default: N). One setting prints the answer; several print a table of N (frames and M with a
video, and the vision tokens of the clip: frames x (M + a frame end)), median prefill time
(vision encoding + prompt forward) and answer. N and M must be perfect squares n*n (n >= 1) no
larger than the encoder's patch grid. On a GPU the model runs in bf16 by default (--device, --dtype).
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.model.video import VideoError, probe_clip, recorded_video_sampling, sample_count
from pipeline.model.vlm import TokenFlexVLM
from tools.options import add_placement_options, add_video_options, parse_token_counts, parse_video_options, placement


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="model folder (from tools.convert_checkpoint or a run's final/)")
    parser.add_argument("--image", action="append", default=[],
                        help="image file; repeat for several images, in order; leave out for a text-only prompt")
    parser.add_argument("--video", help="a video clip, after the images (docs/video.md)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--tokens", default="64", help="vision token count(s) N, comma-separated (default: 64)")
    parser.add_argument(
        "--tiles", type=int, help="at most this many tiles per image (default: the folder's data.max_tiles)"
    )
    add_video_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (default: 32)")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    if args.tiles is not None and args.tiles < 1:
        parser.error("--tiles must be >= 1")
    if args.video is None and (args.frames, args.frame_tokens) != (None, None):
        parser.error("--frames and --frame-tokens go with --video")
    try:
        frames, frame_tokens = parse_video_options(args)
    except ValueError as error:
        parser.error(str(error))
    if args.video is not None:
        try:
            clip = probe_clip(args.video)
        except VideoError as error:
            parser.error(f"--video {args.video}: {error}")
    device, dtype = placement(parser, args)
    try:
        model = TokenFlexVLM.from_pretrained(args.model_dir, device, dtype)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"model_dir: {error}")
    try:
        counts = parse_token_counts(args.tokens)
        for n in counts:
            model.config.check_token_count(n)
    except ValueError as error:
        parser.error(f"--tokens: {error}")
    try:
        for m in filter(None, frame_tokens):
            model.config.check_token_count(m)
    except ValueError as error:
        parser.error(f"--frame-tokens: {error}")
    images = []
    for path in args.image:
        try:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        except OSError as error:
            parser.error(f"--image {path}: {error}")
    if args.video is not None:
        images.append(Path(args.video))
    print(f"{args.model_dir} on {model.device} in {str(model.dtype).removeprefix('torch.')}", file=sys.stderr)
    if args.video is None:
        rows = answers_at_counts(model, images, args.prompt, counts, args.max_new_tokens, max_tiles=args.tiles)
        print(rows[0][2] if len(rows) == 1 else format_answers(rows))
    else:
        rows = answers_at_frames(model, images, args.prompt, clip, counts, frames, frame_tokens, args.max_new_tokens,
                                 max_tiles=args.tiles)
        print(rows[0][-1] if len(rows) == 1 else format_video_answers(rows))
    return 0


def answers_at_counts(model, images, prompt, counts, max_new_tokens=32, repeats=3, max_tiles=None):
    """[(N, median prefill seconds of `repeats` after a warm-up, answer)] for one prompt and its
    images (none, one, or a list) at each N, at most max_tiles tiles per image (None: the folder's)."""
    model.eval()
    images, prompts = [images], [prompt]
    rows = []
    for n in tqdm(counts, desc="generating", unit="N", disable=len(counts) == 1):
        seconds = statistics.median(model.prefill_repeats(images, prompts, n, repeats, max_tiles))
        rows.append((n, seconds, model.generate(images, prompts, n, max_new_tokens, max_tiles)[0]))
    return rows


def answers_at_frames(model, visuals, prompt, clip, counts, frames, frame_tokens, max_new_tokens=32, repeats=3,
                      max_tiles=None):
    """[(N, frames sampled, M, the clip's vision tokens, median prefill seconds, answer)] for one prompt
    with a clip (its visuals' last; clip: its ClipInfo) at each N, frame limit (None: the folder's)
    and M (None: N)."""
    model.eval()
    visuals, prompts = [visuals], [prompt]
    rows = []
    settings = list(itertools.product(counts, frames, frame_tokens))
    for n, limit, m in tqdm(settings, desc="generating", unit="setting", disable=len(settings) == 1):
        sampled = sample_count(clip, *recorded_video_sampling(model.image_processor, limit))
        options = (max_tiles, m, limit)
        seconds = statistics.median(model.prefill_repeats(visuals, prompts, n, repeats, *options))
        answer = model.generate(visuals, prompts, n, max_new_tokens, *options)[0]
        rows.append((n, sampled, n if m is None else m, sampled * ((n if m is None else m) + 1), seconds, answer))
    return rows


def format_answers(rows):
    """An aligned text table: N, prefill ms, answer."""
    cells = [("N", "prefill ms", "answer")] + [(str(n), f"{1000 * s:.2f}", a or "(empty)") for n, s, a in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    return "\n".join(f"{n:>{widths[0]}}  {ms:>{widths[1]}}  {answer}" for n, ms, answer in cells)


def format_video_answers(rows):
    """An aligned text table: N, frames, M, vision tokens of the clip, prefill ms, answer."""
    cells = [("N", "frames", "M", "clip tokens", "prefill ms", "answer")] + [
        (str(n), str(f), str(m), str(t), f"{1000 * s:.2f}", a or "(empty)") for n, f, m, t, s, a in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    return "\n".join("  ".join(f"{c:>{w}}" for c, w in zip(row[:5], widths)) + f"  {row[5]}" for row in cells)


if __name__ == "__main__":
    sys.exit(main())
