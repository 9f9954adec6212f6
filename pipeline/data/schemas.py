"""The conversation schemas data sets are published in, and a row of each as a LLaVA record (the
form shards store and pipeline/model/chat.py reads) plus its images, in the order of their <image> tags.

  llava     `conversations`: [{from: human|gpt, value}], images in `image` (one, or a list) or
            `images` (a list): LLaVA's JSON, LLaVA-OneVision-Data's parquet, LLaMA-Factory's
            sharegpt format. A `video` is a video row.
  cauldron  `texts`: [{user, assistant, source}] and `images` (a list): The Cauldron,
            FineVision. Their texts carry no image tags: the images come first in the first user
            turn, one "<image>\\n" each (as LLaVA places them), unless the texts tag them already.
  messages  `messages`: [{role: system|user|assistant, content}] and `images` (a list): the
            chat-messages form (Nemotron-VLM-Dataset-v2, LLaMA-Factory's sharegpt with
            messages). content is a string with <image> tags, or typed parts: {type: text, text},
            {type: image} (its own image under image/path/url, or else the next of `images`),
            {type: video}; the parts of a turn are joined by newlines. A system turn, which LLaVA
            records can't hold, skips the row (system_message); `videos` or a video part make
            a video row.
An image is a path (relative to the image root) or bytes, alone or as a `datasets` Image
({"bytes", "path"}). The schema is detected from the columns. A row's other columns stay in the
record as they are (ids, data_source, ratings), null ones left out; what no schema explains
(bytes in another column, a role or content part of another kind, a key in a turn) raises
SchemaError, which stops the whole build: silently dropping it would train on something else.
Rows without an `id` column get "row-<index>".
"""

from dataclasses import dataclass

from pipeline.model.chat import IMAGE_TOKEN

SCHEMAS = {"llava": "conversations", "cauldron": "texts", "messages": "messages"}  # name: the column that names it
IMAGE_PART_KEYS = ("image", "path", "url")
TURN_KEYS = {"llava": {"from", "value"}, "cauldron": {"user", "assistant", "source"}}


class SchemaError(ValueError):
    """Data no schema explains, or a schema that doesn't fit the columns: an error for the whole build."""


class Skip(Exception):
    """A row that can't be a sample; reason is its skip reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: its bytes, or a path under the image root; name is its path or file name."""

    data: bytes | None
    name: str | None


def detect_schema(columns: list[str], where: str) -> str:
    """The schema whose naming column the input has; SchemaError when none or several do."""
    found = [name for name, column in SCHEMAS.items() if column in columns]
    if len(found) != 1:
        expected = ", ".join(f"{column} ({name})" for name, column in SCHEMAS.items())
        what = "none of" if not found else f"{len(found)} of"
        raise SchemaError(f"{where}: columns {columns} hold {what} the conversation columns {expected}; "
                          + ("choose with --schema" if found else "is this a conversation data set?"))
    return found[0]


def check_schema(schema: str, columns: list[str], where: str) -> None:
    """SchemaError when the input lacks the column a chosen schema reads."""
    if SCHEMAS[schema] not in columns:
        raise SchemaError(f"{where}: --schema {schema} reads the column {SCHEMAS[schema]!r}, which the input "
                          f"lacks (its columns: {columns})")


def to_llava(row: dict, index: int, schema: str) -> tuple[dict, list[ImageRef]]:
    """(record, images) of a row: the record in LLaVA form, its "image" the images' names (one name
    for a single image, a list for several; llava rows keep their own form). Raises Skip for a row
    that can't be a sample, SchemaError for one that no schema explains."""
    if not isinstance(row, dict):
        raise Skip("malformed_conversation")
    row = {key: value for key, value in row.items() if value is not None}
    if schema == "llava":
        record, images, single = _from_llava(row, index)
    elif schema == "cauldron":
        record, images, single = _from_cauldron(row, index)
    else:
        record, images, single = _from_messages(row, index)
    for key, value in record.items():
        if _holds_bytes(value):
            raise SchemaError(f"row {index}: column {key!r} holds bytes, which the {schema} schema does not read "
                              f"(images belong in its image columns)")
    record.setdefault("id", f"row-{index}")
    if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)):
        raise Skip("malformed_conversation")
    if images:
        names = [image.name for image in images]
        record["image"] = names[0] if single else names
    return record, images


def _from_llava(row: dict, index: int) -> tuple[dict, list[ImageRef], bool]:
    if "video" in row:
        raise Skip("video")
    conversations = row.get("conversations")
    if isinstance(conversations, list):
        for turn_index, turn in enumerate(conversations):
            _check_turn_keys(turn, "llava", index, turn_index)
    record = {key: value for key, value in row.items() if key not in ("image", "images")}
    value = row.get("image", row.get("images"))
    if value is None:
        return record, [], False
    single = not isinstance(value, list)
    values = [value] if single else value
    if not values:
        raise Skip("malformed_conversation")
    return record, [_image_ref(v) for v in values], single


def _from_cauldron(row: dict, index: int) -> tuple[dict, list[ImageRef], bool]:
    texts = row["texts"]
    if not isinstance(texts, list) or not texts:
        raise Skip("malformed_conversation")
    conversations = []
    for turn_index, turn in enumerate(texts):
        _check_turn_keys(turn, "cauldron", index, turn_index)
        conversations += [{"from": "human", "value": turn.get("user")}, {"from": "gpt", "value": turn.get("assistant")}]
    images = [_image_ref(v) for v in row.get("images", [])]
    tagged = any(isinstance(t["value"], str) and IMAGE_TOKEN in t["value"] for t in conversations)
    if images and not tagged and isinstance(conversations[0]["value"], str):
        conversations[0]["value"] = f"{IMAGE_TOKEN}\n" * len(images) + conversations[0]["value"]
    record = {key: value for key, value in row.items() if key not in ("texts", "images")}
    return {**record, "conversations": conversations}, images, len(images) == 1


def _from_messages(row: dict, index: int) -> tuple[dict, list[ImageRef], bool]:
    messages = row["messages"]
    if row.get("videos"):
        raise Skip("video")
    if not isinstance(messages, list) or not messages:
        raise Skip("malformed_conversation")
    listed = [_image_ref(v) for v in row.get("images", [])]
    unused = iter(listed)
    images, conversations = [], []
    for turn_index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Skip("malformed_conversation")
        role, content = message.get("role"), message.get("content")
        if role == "system":
            raise Skip("system_message")
        if role not in ("user", "assistant"):
            raise SchemaError(f"row {index}: message {turn_index} has role {role!r}; the messages schema reads "
                              f"user, assistant and system turns")
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(part.get("text"))
                elif kind == "image":
                    own = next((part[k] for k in IMAGE_PART_KEYS if part.get(k) is not None), None)
                    image = _image_ref(own) if own is not None else next(unused, None)
                    if image is None:
                        raise Skip("image_tag_mismatch")  # an image part with no image for it
                    images.append(image)
                    pieces.append(IMAGE_TOKEN)
                elif kind == "video":
                    raise Skip("video")
                else:
                    raise SchemaError(f"row {index}: message {turn_index} has a content part of type {kind!r}; "
                                      f"the messages schema reads text, image and video parts")
            if not all(isinstance(piece, str) for piece in pieces):
                raise Skip("malformed_conversation")
            content = "\n".join(pieces)
        conversations.append({"from": "human" if role == "user" else "gpt", "value": content})
    if any(isinstance(m.get("content"), list) for m in messages):
        if next(unused, None) is not None:
            raise Skip("image_tag_mismatch")  # listed images that no image part places
    else:
        images = listed  # string contents place the listed images by their <image> tags
    record = {key: value for key, value in row.items() if key not in ("messages", "images", "videos")}
    return {**record, "conversations": conversations}, images, len(images) == 1


def _check_turn_keys(turn: dict, schema: str, index: int, turn_index: int) -> None:
    if isinstance(turn, dict):
        extra = sorted(k for k, v in turn.items() if v is not None and k not in TURN_KEYS[schema])
        if extra:
            raise SchemaError(f"row {index}: turn {turn_index} has key {extra[0]!r}; the {schema} schema reads "
                              f"{sorted(TURN_KEYS[schema])}")


def _image_ref(value: object) -> ImageRef:
    """An image as a row holds it: a path, bytes, or a datasets Image {"bytes", "path"}."""
    if isinstance(value, str) and value:
        return ImageRef(None, value)
    if isinstance(value, bytes):
        return ImageRef(value, None)
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        if value.get("bytes") is not None:
            return ImageRef(value["bytes"], value.get("path") or None)
        if value.get("path"):
            return ImageRef(None, value["path"])
    raise Skip("malformed_conversation")


def _holds_bytes(value: object) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return True
    if isinstance(value, dict):
        return any(_holds_bytes(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_bytes(v) for v in value)
    return False


def conversation_problem(record: dict, num_images: int) -> str | None:
    """The skip reason for a LLaVA record's conversation, or None when it is fine: turns must be
    human/gpt alternating from human with non-empty text, and hold one <image> tag per image."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "malformed_conversation"
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") != ("human", "gpt")[i % 2]:
            return "malformed_conversation"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return "malformed_conversation"
    if sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations) != num_images:
        return "image_tag_mismatch"
    return None
