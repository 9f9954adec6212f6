"""Train one stage: python -m pipeline.train CONFIG.yaml [section.key=value ...]

Launch one process per GPU with torchrun, deepspeed or srun; rank and world size come from
their environment. A run whose output_dir holds a checkpoint resumes from it, also with a
different number of ranks (through a universal checkpoint) or loader workers: the data's
current epoch continues, split over the new ranks and workers.
"""

import argparse
import sys
from collections.abc import Sequence

from pipeline.run.config import describe_options, load_config
from pipeline.train.loop import run
from pipeline.train.preflight import check_inputs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (override any with section.key=value):\n" + "\n".join(describe_options()),
    )
    parser.add_argument("config", help="YAML config, e.g. configs/stage1_align.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run(cfg)
