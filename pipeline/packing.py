"""Which samples go into each packed row: pure functions of lengths and image counts.

A batch is `rows` rows of exactly `seq_len` tokens and a fixed image budget (the same on every
rank for a given N, since ZeRO-3 ranks must run the same collectives). The budget is sized from
the data (see image_budget), so that the vision tower encodes real images, not dummies, while the
rows still fill up; choose_row then picks, row by row, the samples that fill the row and keep
the batch on its share of images.
"""

import math


def sample_length(num_tokens, num_images, num_vision_tokens, seq_len):
    """Tokens a sample takes in a row once each image marker is expanded to N slots, at most
    seq_len (a longer sample is truncated)."""
    return min(num_tokens + num_images * (num_vision_tokens - 1), seq_len)


def image_slots_fit(marker_positions, num_vision_tokens, seq_len):
    """Whether every image's N slots end within seq_len (image slots can't be truncated)."""
    if not marker_positions:
        return True
    last = marker_positions[-1] + (len(marker_positions) - 1) * (num_vision_tokens - 1)
    return last + num_vision_tokens <= seq_len


def image_budget(tokens_per_batch, num_vision_tokens, text_tokens_per_image):
    """Images per batch: the batch's tokens over the tokens each image brings (its N slots plus
    the text that comes with it in the data, text-only samples included), rounded up so that a
    batch never lacks an image slot it could fill."""
    return max(1, math.ceil(tokens_per_batch / (num_vision_tokens + text_tokens_per_image)))


def choose_row(lengths, images, free, images_left, target):
    """Positions (ascending) of the samples that fill one row best.

    lengths, images: each pending sample's tokens (see sample_length) and image count, oldest
    first. free: the row's tokens. images_left: the batch's image slots still open. target: the
    images this row should take, its share of what is left (so that later rows get theirs).

    The oldest sample always goes in when the image budget allows, so none waits forever; the
    rest of the row is the subset with the largest total length that fits, using at most
    images_left images (subset sum with one bitset of reachable totals per image count). Among
    equal totals: the image count nearest the target, then older samples.
    """
    chosen = []
    if images and images[0] <= images_left:
        chosen, free, images_left, target = [0], free - lengths[0], images_left - images[0], target - images[0]
    mask = (1 << (free + 1)) - 1
    reach = [1] + [0] * images_left  # reach[k]: bit t set if total t is reachable with k images
    history = []
    for i in range(len(chosen), len(lengths)):
        history.append(reach)
        reach = list(reach)
        if lengths[i] <= free and images[i] <= images_left:
            for k in range(images_left - images[i], -1, -1):
                reach[k + images[i]] |= (history[-1][k] << lengths[i]) & mask
    total = max(r.bit_length() - 1 for r in reach)
    k = min((k for k, r in enumerate(reach) if r >> total & 1), key=lambda k: abs(k - target))
    # Walk back from the newest sample, leaving out every sample the total can do without.
    for i, before in zip(range(len(lengths) - 1, -1, -1), reversed(history)):
        if not before[k] >> total & 1:
            chosen.append(i)
            total, k = total - lengths[i], k - images[i]
    return sorted(chosen)
