"""Command-line options shared by the model tools: token counts, device and dtype."""

from pipeline.model import DTYPES, inference_placement


def parse_token_counts(text):
    """'16,64,256' -> [16, 64, 256] (ValueError on anything else)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"token counts must be comma-separated integers, got {text!r}") from None
    if not counts:
        raise ValueError("no token counts given")
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
