"""Convert a training run's ZeRO checkpoint into a model folder for generate, evaluate or stage 2.

    python -m tools.convert_checkpoint runs/stage1 runs/stage1-step100 --tag step-000100
    python -m tools.convert_checkpoint runs/stage2/checkpoints runs/stage2-bf16 --dtype bf16

CKPT_DIR is a run's output_dir, its checkpoints/ folder or one step-XXXXXX folder. The
written folder is checked against the checkpoint on a probe batch unless --no-verify. It
carries transformers remote code (AutoModel.from_pretrained(OUT, trust_remote_code=True)
loads it without this project) and a README.md model card.
Stage 1 exports its last checkpoint to <output_dir>/final by itself; stage 2 starts from
that folder (model.init_from).
"""

import argparse
import sys

from pipeline.export.convert import ConversionError, convert_checkpoint
from pipeline.model.runtime import DTYPES

USAGE_ERROR = 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="run output_dir, its checkpoints/ folder, or a step-XXXXXX folder")
    parser.add_argument("out_dir", help="model folder to write")
    parser.add_argument("--tag", help="checkpoint to convert, e.g. step-000100 (default: the one `latest` names)")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="weight dtype in the folder (default: fp32)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file; bigger models are "
                        "split into shards with an index (default: 5GB)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip comparing the folder's logits with the checkpoint's on a probe batch")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.ckpt_dir, args.out_dir, args.tag, args.dtype, args.max_shard_size,
                           verify=not args.no_verify)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {args.out_dir}" + ("" if args.no_verify else " (verified: logits match the checkpoint)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
