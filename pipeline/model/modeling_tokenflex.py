"""transformers' remote code for a TokenFLEX model folder. Plain transformers loads the folder,
without this project on the path:

    from transformers import AutoModel
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)  # or AutoModelForImageTextToText
    model.generate([image], ["What is written?"], num_vision_tokens=64)

write_model_folder copies this file, and the project modules it imports relatively (found with
transformers' own get_relative_import_files), into every model folder; config.json's auto_map
names the classes below. The model is the project's own TokenFlexVLM, loaded by its own
from_pretrained: there is no second copy of its logic.
"""

import warnings
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import PreTrainedConfig

from .folder import MODEL_TYPE
from .vlm import TokenFlexVLM

# what the Auto classes pass to a remote model's from_pretrained besides the caller's options
AUTO_CLASS_OPTIONS = {"config", "trust_remote_code", "adapter_kwargs", "_from_auto", "revision"}


class TokenFlexConfig(PreTrainedConfig):
    """config.json as AutoConfig reads it; the model reads the file itself (read_vlm_config)."""

    model_type = MODEL_TYPE


class TokenFlexModel(TokenFlexVLM):
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device_map: str | torch.device | None = None,
                        **options: object) -> "TokenFlexModel":
        """TokenFlexVLM.from_pretrained of a folder (or a hub repository's snapshot), in eval
        mode, built on `device_map` (one device: "cuda:0", "cpu"; default cpu) in `dtype` (a torch
        dtype or its name; default float32)."""
        ignored = sorted(set(options) - AUTO_CLASS_OPTIONS)
        if ignored:
            warnings.warn(f"TokenFlexModel.from_pretrained ignores {', '.join(ignored)}", stacklevel=2)
        dtype = dtype or torch_dtype
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        if device_map == "auto" or (device_map is not None and not isinstance(device_map, (str, torch.device))):
            raise ValueError(f"device_map={device_map!r}: give one device, e.g. 'cuda:0'; the model is not split")
        if not Path(path).is_dir():  # a hub repository: the Auto class fetched only config and code
            path = snapshot_download(path, revision=options.get("revision"))
        return super().from_pretrained(path, device=device_map or "cpu", dtype=dtype or torch.float32).eval()

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoModel") -> None:
        """Called by the Auto classes on remote models; config.json's auto_map already names this class."""
