"""Which samples go into each packed row: pure functions of lengths and tile counts.

A batch is `rows` rows of exactly `seq_len` tokens and a fixed tile budget (the same on every
rank for a given N, since ZeRO-3 ranks must run the same collectives; a tile is what the vision
tower encodes: one per image when data.max_tiles is 1). The budget is sized from the data (see
tile_budget), so that the vision tower encodes real tiles, not dummies, while the rows still fill
up; choose_row then picks, row by row, the samples that fill the row and keep the batch on its
share of tiles.
"""

import math


def sample_length(num_tokens: int, slots_per_image: list[int], seq_len: int) -> int:
    """Tokens a sample takes in a row once each image marker is expanded to its slots, at most
    seq_len (a longer sample is truncated)."""
    return min(num_tokens + sum(slots_per_image) - len(slots_per_image), seq_len)


def image_slots_fit(marker_positions: list[int], slots_per_image: list[int], seq_len: int) -> bool:
    """Whether every image's slots end within seq_len (image slots can't be truncated)."""
    if not marker_positions:
        return True
    last = marker_positions[-1] + sum(slots_per_image[:-1]) - (len(marker_positions) - 1)
    return last + slots_per_image[-1] <= seq_len


def tile_budget(tokens_per_batch: int, num_vision_tokens: int, text_tokens_per_tile: float) -> int:
    """Tiles per batch: the batch's tokens over the tokens each tile brings (its N slots plus the
    text, row ends included, that comes with it in the data, text-only samples included), rounded
    up so that a batch never lacks a tile slot it could fill."""
    return max(1, math.ceil(tokens_per_batch / (num_vision_tokens + text_tokens_per_tile)))


def choose_row(lengths: list[int], tiles: list[int], free: int, tiles_left: int, target: float) -> list[int]:
    """Positions (ascending) of the samples that fill one row best.

    lengths, tiles: each pending sample's tokens (see sample_length) and tile count, oldest
    first. free: the row's tokens. tiles_left: the batch's tile slots still open. target: the
    tiles this row should take, its share of what is left (so that later rows get theirs).

    The oldest sample always goes in when the image budget allows, so none waits forever; the
    rest of the row is the subset with the largest total length that fits, using at most
    tiles_left tiles (subset sum with one bitset of reachable totals per tile count). Among
    equal totals: the tile count nearest the target, then older samples.
    """
    chosen = []
    if tiles and tiles[0] <= tiles_left:
        chosen, free, tiles_left, target = [0], free - lengths[0], tiles_left - tiles[0], target - tiles[0]
    mask = (1 << (free + 1)) - 1
    reach = [1] + [0] * tiles_left  # reach[k]: bit t set if total t is reachable with k tiles
    history = []
    for i in range(len(chosen), len(lengths)):
        history.append(reach)
        reach = list(reach)
        if lengths[i] <= free and tiles[i] <= tiles_left:
            for k in range(tiles_left - tiles[i], -1, -1):
                reach[k + tiles[i]] |= (history[-1][k] << lengths[i]) & mask
    total = max(r.bit_length() - 1 for r in reach)
    k = min((k for k, r in enumerate(reach) if r >> total & 1), key=lambda k: abs(k - target))
    # Walk back from the newest sample, leaving out every sample the total can do without.
    for i, before in zip(range(len(lengths) - 1, -1, -1), reversed(history)):
        if not before[k] >> total & 1:
            chosen.append(i)
            total, k = total - lengths[i], k - tiles[i]
    return sorted(chosen)
