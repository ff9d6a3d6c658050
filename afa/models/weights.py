"""Loading the ImageNet MiT weights into an encoder, with one-line errors for the wrong file.

Two sources load: an official SegFormer file ``mit_b0.pth`` .. ``mit_b5.pth``, and a Hugging Face
``nvidia/mit-b*`` download directory (``model.safetensors`` or ``pytorch_model.bin``, key names
converted by :mod:`afa.models.hf_convert`). Either must match the encoder's keys and shapes
exactly once the ImageNet head is dropped.

Anything else is refused by :func:`load_pretrained` with :class:`WeightsError`, whose message is
one line naming the file, the variant the model wants and what the file holds instead: another
variant (told from the shapes and block counts of its keys), a full AFA checkpoint given by
mistake, no MiT weights at all, or bytes that do not read as a checkpoint.
``.pth`` files are read through :func:`afa.safe_load.read_torch_file` (data only, never code).
"""

from __future__ import annotations

import hashlib
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from afa.models.hf_convert import convert_hf_mit_keys
from afa.models.mix_transformer import MIT_SETTINGS, MixVisionTransformer, checkpoint_filter_fn
from afa.safe_load import CheckpointError, UnsafeFileError, read_torch_file

__all__ = [
    "PretrainedWeights",
    "WEIGHTS_HELP",
    "WeightsError",
    "hf_weight_file",
    "load_pretrained",
    "sha256_prefix",
]

WEIGHTS_HELP = (
    "Download the ImageNet-1k MiT weights {name}.pth from the SegFormer release "
    "(github.com/NVlabs/SegFormer, README section 'Training', 'imagenet-1k pretrained weights') and "
    "put the file at {path} or point at it with model.pretrained=/path/to/{name}.pth, or train "
    "from scratch with model.pretrained=null (see pretrained/README.md)."
)


class WeightsError(ValueError):
    """Pretrained weights that cannot initialise the encoder. The message is one line naming the
    file, the model's variant and what the file holds instead, so a command-line tool can print it
    without a traceback."""


class PretrainedWeights(NamedTuple):
    """What :func:`load_pretrained` loaded, for the record of a run; ``str()`` gives the log line
    ``mit_b1 weights from pretrained/mit_b1.pth (sha256 1a2b3c4d5e6f)``."""

    path: str  # as given: a ``.pth`` file or a Hugging Face directory
    sha256: str  # first 12 hex digits of the SHA-256 of the weight file
    variant: str  # mit_b0 .. mit_b5

    def __str__(self) -> str:
        return f"{self.variant} weights from {self.path} (sha256 {self.sha256})"


def sha256_prefix(path: str | Path, digits: int = 12, chunk_bytes: int = 1 << 20) -> str:
    """First ``digits`` hex digits of the file's SHA-256, read in chunks (weights reach 330 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()[:digits]


def hf_weight_file(directory: str | Path) -> Path | None:
    """The weight file of a Hugging Face download: ``model.safetensors`` (preferred) or
    ``pytorch_model.bin``; None when ``directory`` holds neither."""
    directory = Path(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


# --------------------------------------------------------------------------------------------
# What a file holds
# --------------------------------------------------------------------------------------------


def _mit_variant(state_dict: Mapping) -> tuple[str | None, str | None]:
    """``(variant, layout)`` read off the shapes of an official-layout MiT state dict.

    The stage widths come from the ``patch_embed{i}.proj`` weights (stage 1: 32 for mit_b0, 64 for
    the others) and the blocks per stage from the ``block{i}.{j}.*`` indices, which tell b1..b5
    apart. ``(None, None)`` when the keys are not MiT's; ``(None, layout)`` for an unknown MiT.
    """
    widths = []
    for i in range(1, 5):
        weight = state_dict.get(f"patch_embed{i}.proj.weight")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            return None, None
        widths.append(weight.shape[0])
    keys = [k for k in state_dict if isinstance(k, str)]
    depths = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"block{i}.")})
                   for i in range(1, 5))
    for name, (embed_dims, _, variant_depths) in MIT_SETTINGS.items():
        if tuple(widths) == embed_dims and depths == variant_depths:
            return name, None
    return None, f"stage widths {tuple(widths)}, blocks per stage {depths}"


def _describe(state_dict) -> tuple[str | None, str]:
    """``(variant, what)``: the MiT variant a checkpoint holds (None if none) and what it is, as
    the words after "holds" in an error message."""
    if not isinstance(state_dict, Mapping):
        return None, f"no MiT weights (a {type(state_dict).__name__}, not a state dict)"
    keys = [k.removeprefix("module.") for k in state_dict if isinstance(k, str)]
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return None, "a full AFA model checkpoint (encoder.*, decoder.*)"
    variant, layout = _mit_variant(state_dict)
    if variant:
        return variant, f"{variant} weights"
    if layout:
        return None, f"MiT weights of no official variant ({layout})"
    if not keys:
        return None, "no MiT weights (an empty state dict)"
    return None, f"no MiT weights ({len(keys)} keys such as {keys[0]!r})"


def _first_mismatch(own: Mapping, state_dict: Mapping) -> str | None:
    """Why ``state_dict`` does not load strictly into a model whose state dict is ``own``."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        return f"{len(missing)} keys missing, {len(unexpected)} unexpected (first: {first!r})"
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            return f"{key!r} is a {type(value).__name__}, not a tensor"
        if value.shape != own[key].shape:
            return (f"{key!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(own[key].shape)}")
    return None


def _pickled_strings(path: Path) -> list[str] | None:
    """The strings (dict keys among them) of the pickle inside a ``torch.save`` archive, read
    opcode by opcode without running it; None when ``path`` is no such archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                return None
            data = archive.read(pickles[0])
        return [arg for op, arg, _ in pickletools.genops(data)
                if "UNICODE" in op.name and isinstance(arg, str)]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):  # ValueError: a broken pickle
        return None


# --------------------------------------------------------------------------------------------
# Reading and loading
# --------------------------------------------------------------------------------------------


def _read_weights(path: Path, weight_file: Path, name: str):
    """The object saved in ``weight_file`` (of ``path``, for a Hugging Face directory); WeightsError
    if it is no readable checkpoint of tensors. ``name``: the variant the model wants."""
    if weight_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(weight_file))
        except Exception as err:  # safetensors has its own error types for a damaged file
            raise WeightsError(f"{weight_file} cannot be read as a safetensors file "
                               f"({type(err).__name__}); download {name} again") from err
    try:
        return read_torch_file(weight_file, what="pretrained weights")
    except UnsafeFileError as err:
        strings = _pickled_strings(weight_file)
        if strings is not None:
            # A sound archive holding Python objects besides tensors (a checkpoint that pickled
            # its optimiser or config objects, say): its keys tell what it is, unexecuted.
            _, what = _describe(dict.fromkeys(strings))
            if what.startswith("no MiT weights"):
                what = "no MiT weights (Python objects besides tensors)"
            raise WeightsError(f"{path} holds {what}; model.pretrained wants the ImageNet MiT "
                               f"encoder weights {name}.pth") from err
        cause = err.__context__ or err
    except CheckpointError as err:  # truncated, damaged, or not a PyTorch file at all
        # read_torch_file raises its one-line error ``from None``; the error torch raised (which
        # of UnpicklingError, EOFError, RuntimeError, ... depends on where the bytes go wrong) is
        # still its __context__, and its name is what this message shows.
        cause = err.__context__ or err
    except Exception as err:  # noqa: BLE001 - see below
        # A pickle cut short inside a sound zip archive fails deeper in torch's weights-only
        # unpickler (struct.error), which read_torch_file does not translate.
        cause = err
    raise WeightsError(f"{weight_file} cannot be read as a PyTorch checkpoint "
                       f"({type(cause).__name__}); is it a complete download of {name}.pth?"
                       ) from cause


def _weight_file(path: Path, name: str) -> Path:
    """The file to read for ``path`` (a ``.pth`` file or a Hugging Face directory);
    FileNotFoundError saying where the weights come from when there is none."""
    weight_file = hf_weight_file(path) if path.is_dir() else path
    if weight_file is None:
        raise FileNotFoundError(
            f"'{path}' is a directory but holds neither model.safetensors nor pytorch_model.bin "
            f"(a Hugging Face nvidia/mit-b* download). {WEIGHTS_HELP.format(name=name, path=path)}")
    if not weight_file.is_file():
        raise FileNotFoundError(f"Pretrained weights for {name} not found at '{path}'. "
                                + WEIGHTS_HELP.format(name=name, path=path))
    return weight_file


def load_pretrained(model: MixVisionTransformer, path: str | Path,
                    name: str = "mit_b1") -> PretrainedWeights:
    """Load official ``mit_b*.pth`` weights (or a Hugging Face ``nvidia/mit-b*`` directory) and
    return what was loaded: the path, the SHA-256 prefix of the weight file and the variant.

    Keys and shapes must match exactly once ``head.*`` is dropped. A missing file raises
    FileNotFoundError with where the file comes from; any other unusable file raises
    :class:`WeightsError` with a one-line message naming the file, the model's variant ``name`` and
    what the file holds: another MiT variant (told from its shapes and block counts), a full AFA
    checkpoint, something else, or bytes torch cannot read.
    """
    path = Path(path)
    own = model.state_dict()
    name = _mit_variant(own)[0] or name  # the variant built, should ``name`` disagree
    weight_file = _weight_file(path, name)
    state_dict = _read_weights(path, weight_file, name)
    if isinstance(state_dict, Mapping):
        state_dict = checkpoint_filter_fn(state_dict)
        if path.is_dir():
            try:
                state_dict = convert_hf_mit_keys(state_dict)
            except KeyError as err:
                raise WeightsError(f"{path} holds Hugging Face weights that do not convert to "
                                   f"MiT names: {err.args[0]}") from err
    mismatch = _first_mismatch(own, state_dict) if isinstance(state_dict, Mapping) else None
    if isinstance(state_dict, Mapping) and mismatch is None:
        model.load_state_dict(state_dict, strict=True)
        return PretrainedWeights(str(path), sha256_prefix(weight_file), name)
    raise _refusal(path, state_dict, name, mismatch)


def _refusal(path: Path, state_dict, model_variant: str, mismatch: str | None) -> WeightsError:
    """The one-line error for weights that do not fit a ``model_variant`` encoder."""
    variant, what = _describe(state_dict)
    if variant == model_variant:  # the right variant, yet something differs (e.g. in_chans)
        return WeightsError(f"{path} holds {variant} weights that do not fit the {model_variant} "
                            f"encoder: {mismatch}")
    if variant:
        return WeightsError(
            f"{path} holds {variant} weights, but model.backbone is {model_variant}: set "
            f"model.backbone={variant} or model.pretrained={path.parent / model_variant}.pth")
    return WeightsError(f"{path} holds {what}; model.pretrained wants the ImageNet MiT encoder "
                        f"weights {model_variant}.pth")
