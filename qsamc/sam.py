"""SAM image encoders: the model zoo, the torchvision-free import, and checkpoint loading.

This is the first step of every pipeline: build segment-anything's `ImageEncoderViT` for a named
config and load its weights. The supernet (`qsamc.supernet.encoder`) is built by transforming this encoder.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from qsamc.errors import CheckpointError, ConfigError


def _import_sam_modeling() -> types.ModuleType:
    """Import `segment_anything.modeling` without running `segment_anything/__init__.py`.

    The package `__init__` imports the predictor, which imports torchvision; torchvision cannot load
    against CPU-only torch builds, and the encoder modules never need it. We register a bare package
    object for `segment_anything` (its real `__path__`, none of its `__init__`) so that submodules import
    normally. A user who already imported the full package keeps it.
    """
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("segment-anything is not installed: pip install segment-anything")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


sam_modeling = _import_sam_modeling()
ImageEncoderViT = sam_modeling.ImageEncoderViT
Block = sam_modeling.image_encoder.Block
Attention = sam_modeling.image_encoder.Attention
get_rel_pos = sam_modeling.image_encoder.get_rel_pos
add_decomposed_rel_pos = sam_modeling.image_encoder.add_decomposed_rel_pos
MLPBlock = sam_modeling.common.MLPBlock
LayerNorm2d = sam_modeling.common.LayerNorm2d


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture of one SAM image encoder, as `segment_anything.build_sam` builds it."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256
    mlp_ratio: float = 4.0

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        """Block indices of each stage: the runs of blocks ending at a global-attention block."""
        stages, start = [], 0
        for g in self.global_attn_indexes:
            stages.append(tuple(range(start, g + 1)))
            start = g + 1
        return tuple(stages)

    def build(self) -> nn.Module:
        """A freshly initialised `ImageEncoderViT` with exactly segment-anything's hyper-parameters."""
        return ImageEncoderViT(
            depth=self.depth,
            embed_dim=self.embed_dim,
            img_size=self.img_size,
            mlp_ratio=self.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=self.num_heads,
            patch_size=self.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=self.global_attn_indexes,
            window_size=self.window_size,
            out_chans=self.out_chans,
        )


MODEL_ZOO: dict[str, EncoderConfig] = {
    # segment_anything/build_sam.py: build_sam_vit_{b,l,h}.
    "vit_b": EncoderConfig("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderConfig("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderConfig("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # Same structure as vit_b (4 stages of 3, windowed + global attention, rel-pos, neck), scaled down
    # so that a forward pass takes milliseconds on a CPU: the embedded default and the test model.
    # Window 4 on a 16x16 token grid tiles exactly at 256 and pads at the smaller resolutions.
    "vit_t": EncoderConfig(
        "vit_t", 64, 12, 2, (2, 5, 8, 11), img_size=256, window_size=4, out_chans=32
    ),
}


def get_config(name: str) -> EncoderConfig:
    try:
        return MODEL_ZOO[name]
    except KeyError:
        raise ConfigError(
            f"unknown model '{name}'; known models are {', '.join(sorted(MODEL_ZOO))}"
        ) from None


def is_quantizer_state(key: str) -> bool:
    """Whether a supernet state-dict key is a quantizer's (step size, offset, observed range): the layers'
    `weight_quantizer` / `act_quantizer` banks and quantized attention's `attention_quantizers`."""
    return "_quantizer." in key or "attention_quantizers." in key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from an untrusted file (`weights_only=True`): a whole SAM or a bare encoder.

    An official `sam_vit_*.pth` holds the whole SAM; its `image_encoder.*` keys are the encoder. A qsamc
    run's `supernet.pt` holds encoder + quantizers + head under `supernet.*` / `head.*`; its encoder is
    the `supernet.*` weights without the quantizers. A supernet with LoRA is refused: its pre-trained
    weights alone are not the model it trained.
    """
    obj = read_tensors(path)
    for prefix in ("image_encoder.", "supernet."):
        if any(k.startswith(prefix) for k in obj):
            if prefix == "supernet." and any(".lora." in k for k in obj):
                raise CheckpointError(
                    f"checkpoint {path} is a supernet trained with LoRA; start from an FP32 reference run "
                    f"(`qsamc train --schedule fp32`) or a SAM checkpoint")
            obj = {k[len(prefix):]: v for k, v in obj.items()
                   if k.startswith(prefix) and not is_quantizer_state(k)}
            break
    return obj


PROMPT_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def read_prompt_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The prompt encoder and mask decoder of a whole SAM checkpoint (`sam_vit_*.pth`), read with the
    same rules as `read_state_dict`; keys keep their `prompt_encoder.` / `mask_decoder.` prefixes."""
    obj = read_tensors(path)
    missing = [p.rstrip(".") for p in PROMPT_PREFIXES if not any(k.startswith(p) for k in obj)]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {' or '.join(m.replace('_', ' ') for m in missing)} weights "
            f"(no {' or '.join(repr(m + '.*') for m in missing)} keys): "
            f"give a whole SAM checkpoint such as sam_vit_b_01ec64.pth, or leave it out for a freshly "
            f"initialised prompt encoder and mask decoder"
        )
    return {k: v for k, v in obj.items() if k.startswith(PROMPT_PREFIXES)}


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A non-empty dict of tensors from an untrusted file, or one sentence saying why not."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: its zip archive has no central directory")
    if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint file (neither a torch.save archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused something: name it, and never suggest weights_only=False for an untrusted file
        lines = [line.strip() for line in str(exc).replace("WeightsUnpickler error:", "\n").splitlines()]
        lines = [line for line in lines if line]
        named = [line for line in lines if "unsupported" in line.lower() or "GLOBAL" in line]
        reason = (named or lines or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
        reason = reason.removeprefix("Trying to load ")
        raise CheckpointError(f"checkpoint {path} holds something other than tensors, which qsamc never loads "
                              f"from an untrusted file ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason})") from None
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is not a state dict: entry '{bad}' is not a tensor")
    return obj


def check_state_dict(
    model: nn.Module | dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, model_name: str
) -> None:
    """Raise one sentence naming the first key or shape of `state` that does not fit `model` (a module,
    or the state dict it expects)."""
    expected = model.state_dict() if isinstance(model, nn.Module) else model
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {source} does not fit {model_name}: key '{key}' is missing")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint {source} does not fit {model_name}: '{key}' has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the model"
            )
    extra = next((k for k in state if k not in expected), None)
    if extra is not None:
        raise CheckpointError(
            f"checkpoint {source} does not fit {model_name}: unexpected key '{extra}'"
        )


def build_encoder(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """The named SAM image encoder, with weights from `checkpoint` when given."""
    config = get_config(name)
    encoder = config.build()
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        check_state_dict(encoder, state, str(checkpoint), name)
        encoder.load_state_dict(state)
    return encoder.eval()
