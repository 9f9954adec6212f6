"""Command-line options shared by the model tools: model folders and names, token and tile counts,
device and dtype."""

from pipeline.eval.heldout import default_names
from pipeline.model.runtime import DTYPES, inference_placement


def add_model_options(parser):
    """The model folders a tool compares, their names in its table and plot, its output folder."""
    parser.add_argument("model_dirs", nargs="+", help="model folders to compare")
    parser.add_argument("--names", help="comma-separated model names for the table and plot (default: folder names)")
    parser.add_argument("--out", required=True, help="output folder")


def model_names(parser, args):
    """--names as a list (the folders' names without it); a usage error when there are more or fewer
    names than folders."""
    names = args.names.split(",") if args.names else default_names(args.model_dirs)
    if len(names) != len(args.model_dirs):
        parser.error(f"{len(names)} names (--names) for {len(args.model_dirs)} model folders")
    return names


def parse_token_counts(text):
    """'16,64,256' -> [16, 64, 256] (ValueError on anything else)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"token counts must be comma-separated integers, got {text!r}") from None
    if not counts:
        raise ValueError("no token counts given")
    return counts


def add_tiles_option(parser):
    parser.add_argument("--tiles", help="comma-separated tile limits per image, e.g. 1,4 (pipeline/model/tiles.py; "
                                        "default: what each model folder records, its data.max_tiles)")


def parse_tile_counts(text):
    """--tiles: '1,4' -> [1, 4]; None -> [None] (each folder's own); ValueError on anything else."""
    if text is None:
        return [None]
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--tiles must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--tiles must name tile limits >= 1, got {text!r}")
    return counts


def add_placement_options(parser):
    parser.add_argument("--device", help="where the model runs: cuda, cuda:1, cpu, ... (default: cuda when torch "
                                         "sees a GPU, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights and activations (default: bf16 on a GPU, "
                                                              "fp32 on CPU)")


def placement(parser, args):
    """(device, dtype) from --device and --dtype; a usage error naming the option when unusable."""
    try:
        return inference_placement(args.device, args.dtype)
    except ValueError as error:
        parser.error(f"--device: {error}")
