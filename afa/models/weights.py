"""Loading the ImageNet MiT weights into an encoder, with one-line errors for the wrong file.

Three sources load: an official SegFormer file ``mit_b0.pth`` .. ``mit_b5.pth``; a Hugging Face
``nvidia/mit-b*`` download directory (``model.safetensors`` or ``pytorch_model.bin``, key names
converted by :mod:`afa.models.hf_convert`); and a hub id ``hf:nvidia/mit-b1[@revision]``, which
``huggingface_hub`` resolves to that same weight file in its cache (see :func:`hub_weight_file`).
Each must match the encoder's keys and shapes exactly once the ImageNet head is dropped.

Anything else is refused by :func:`load_pretrained` with :class:`WeightsError`, whose message is
one line naming the file, the variant the model wants and what the file holds instead: another
variant (told from the shapes and block counts of its keys), a full AFA checkpoint given by
mistake, no MiT weights at all, or bytes that do not read as a checkpoint.
``.pth`` files are read through :func:`afa.safe_load.read_torch_file` (data only, never code).
"""

from __future__ import annotations

import hashlib
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from afa.models.hf_convert import convert_hf_mit_keys
from afa.models.mix_transformer import MIT_SETTINGS, MixVisionTransformer, checkpoint_filter_fn
from afa.safe_load import CheckpointError, UnsafeFileError, read_torch_file

__all__ = [
    "HF_FILES",
    "HUB_PREFIX",
    "HubWeights",
    "PretrainedWeights",
    "WEIGHTS_HELP",
    "WeightsError",
    "hf_weight_file",
    "hub_id",
    "hub_weight_file",
    "load_pretrained",
    "sha256_prefix",
]

HUB_PREFIX = "hf:"  # model.pretrained=hf:nvidia/mit-b1[@revision]
# The weight files of a Hugging Face nvidia/mit-b* repository, preferred first: safetensors holds
# tensors only, pytorch_model.bin is a pickle (read data-only all the same).
HF_FILES = ("model.safetensors", "pytorch_model.bin")

WEIGHTS_HELP = (
    "Get the ImageNet-1k MiT weights with model.pretrained=hf:{hub} (the Hugging Face hub, "
    "downloaded once into its cache), or put the SegFormer release file {name}.pth "
    "(github.com/NVlabs/SegFormer; its download links may be dead) at {path} or point at it with "
    "model.pretrained=/path/to/{name}.pth, or train from scratch with model.pretrained=null "
    "(see pretrained/README.md)."
)


class WeightsError(ValueError):
    """Pretrained weights that cannot initialise the encoder. The message is one line naming the
    file, the model's variant and what the file holds instead, so a command-line tool can print it
    without a traceback."""


class PretrainedWeights(NamedTuple):
    """What :func:`load_pretrained` loaded, for the record of a run; ``str()`` gives the log line
    ``mit_b1 weights from pretrained/mit_b1.pth (sha256 1a2b3c4d5e6f)``, or for a hub id
    ``mit_b1 weights from hf:nvidia/mit-b1@<commit hash> (sha256 1a2b3c4d5e6f)``."""

    # As given (a ``.pth`` file or a Hugging Face directory), or a hub id pinned to the commit it
    # resolved to, ``hf:nvidia/mit-b1@<40 hex digits>``: passed back as model.pretrained, that
    # loads the same bytes however the repository's branches move.
    path: str
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
    for name in HF_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


# --------------------------------------------------------------------------------------------
# The Hugging Face hub
# --------------------------------------------------------------------------------------------


class HubWeights(NamedTuple):
    """A weight file of a hub repository, as :func:`hub_weight_file` found it."""

    repo_id: str  # e.g. nvidia/mit-b1
    revision: str  # the commit hash the requested revision resolved to
    file: Path  # the file in the cache: snapshots/<revision>/<one of HF_FILES>

    @property
    def pinned(self) -> str:
        """``hf:<repo_id>@<commit>``: the source that loads these very bytes again."""
        return f"{HUB_PREFIX}{self.repo_id}@{self.revision}"


def hub_id(variant: str) -> str:
    """The hub repository of an MiT variant's ImageNet weights: mit_b1 -> nvidia/mit-b1."""
    return "nvidia/" + variant.replace("_", "-")


def _is_hub_spec(path) -> bool:
    return isinstance(path, (str, Path)) and str(path).startswith(HUB_PREFIX)


def _parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``(repo_id, revision or None)`` of ``hf:<repo_id>[@revision]``; WeightsError if malformed."""
    repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
    # The library's own check of ids: the same rules the hub applies, and no path tricks
    # (``..``, absolute paths) reaching the cache's folder names.
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        raise WeightsError(f"model.pretrained={spec} is no hub id of the form "
                           f"hf:nvidia/mit-b1[@revision]: {str(err).splitlines()[0]}") from None
    if at and not revision:
        raise WeightsError(f"model.pretrained={spec} has an empty revision after '@'; give a "
                           f"branch, tag or commit hash, or leave '@' out for main")
    return repo_id, revision or None


def _one_line(err: BaseException, limit: int = 200) -> str:
    """The error's type and first line, cut at ``limit`` characters: some network errors of the
    library run to several lines of nested reprs."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def hub_weight_file(spec: str, variant: str = "mit_b1") -> HubWeights:
    """Resolve ``hf:<repo_id>[@revision]`` to a weight file in the Hugging Face cache.

    The cache is ``huggingface_hub``'s (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
    ``~/.cache/huggingface/hub``), in its own layout, so a file fetched once serves every later run
    and any other tool. Looked up in the cache first (no network round trip, and a run that worked
    once still works with the hub unreachable), then downloaded unless ``HF_HUB_OFFLINE`` is set;
    ``model.safetensors`` is preferred to ``pytorch_model.bin`` at each step.

    FileNotFoundError when neither the cache nor the hub has the weights (offline, or the network
    fails): one line naming the repository, the cache and the manual alternative. WeightsError for
    an id or revision the hub does not know, or a repository with neither weight file.
    ``variant`` (the encoder's) only words the messages.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
        # huggingface_hub.utils, not .errors: it names these errors in 0.24 as in 2.x.
        from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError,
                                           LocalEntryNotFoundError, RepositoryNotFoundError,
                                           RevisionNotFoundError)
    except ImportError as err:
        raise WeightsError(f"model.pretrained={spec} needs the huggingface_hub package, 0.24 or "
                           f"newer (pip install -r requirements.txt; {err}), or download the "
                           f"repository's folder and pass its path as model.pretrained") from err
    repo_id, revision = _parse_hub_spec(spec)
    where = f"{repo_id}@{revision}" if revision else repo_id
    cache = constants.HF_HUB_CACHE
    offline = constants.HF_HUB_OFFLINE
    unreachable = None  # why the hub could not be asked, once it could not
    for local_only in ((True,) if offline else (True, False)):
        for filename in HF_FILES:
            try:
                file = Path(hf_hub_download(repo_id, filename, revision=revision,
                                            local_files_only=local_only))
            except LocalEntryNotFoundError as err:  # not cached; online: not cached, no network
                if local_only:
                    continue
                unreachable = _one_line(err.__cause__ or err)
                break  # the next file would wait for the same network in vain
            except EntryNotFoundError:  # the hub answered: this repository has no such file
                continue
            except GatedRepoError as err:
                raise WeightsError(f"model.pretrained={spec}: {repo_id} is gated on the Hugging "
                                   f"Face hub ({_one_line(err)}); accept its terms there and log "
                                   f"in (HF_TOKEN or the hf command)") from None
            except RepositoryNotFoundError:
                raise WeightsError(
                    f"model.pretrained={spec}: the Hugging Face hub has no repository {repo_id} "
                    f"(or it is private); the ImageNet MiT weights are nvidia/mit-b0 .. "
                    f"nvidia/mit-b5, e.g. hf:{hub_id(variant)}") from None
            except RevisionNotFoundError:
                raise WeightsError(f"model.pretrained={spec}: {repo_id} has no revision "
                                   f"{revision!r} on the Hugging Face hub (a branch, tag or "
                                   f"commit hash); leave '@{revision}' out for main") from None
            except OSError as err:  # any other HTTP error of the hub, a proxy, a full disk
                if local_only:  # an unreadable cache: its own error names the file
                    raise
                unreachable = _one_line(err)
                break
            # snapshots/<commit hash>/<filename>: the library's layout names the commit.
            return HubWeights(repo_id, file.parent.name, file)
    if offline or unreachable:
        reason = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached: {unreachable}"
        folder = repo_id.split("/")[-1]
        raise FileNotFoundError(
            f"model.pretrained={spec}: {where} ({' or '.join(HF_FILES)}) is not in the Hugging "
            f"Face cache {cache} and {reason}. Where the hub is reachable, download "
            f"{' or '.join(HF_FILES)} of huggingface.co/{repo_id} into a folder and pass "
            f"model.pretrained=/path/to/{folder}, or run once there and copy the cache here "
            f"(HF_HUB_CACHE or HF_HOME names another cache)")
    raise WeightsError(f"model.pretrained={spec}: {where} on the Hugging Face hub has neither "
                       f"{' nor '.join(HF_FILES)}; the ImageNet MiT weights are nvidia/mit-b0 .. "
                       f"nvidia/mit-b5, e.g. hf:{hub_id(variant)}")


def _check_blob(hub: HubWeights, digest: str) -> None:
    """The cache names a large (LFS) file's blob by its SHA-256: a file whose bytes differ was cut
    short or damaged after the download, and would otherwise fail later with a vaguer error."""
    blob = hub.file.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", blob) and blob != digest:
        raise WeightsError(
            f"model.pretrained={hub.pinned}: the cached {hub.file.name} ({hub.file.resolve()}) "
            f"does not match its SHA-256 {blob[:12]}... (sha256 {digest[:12]}): a damaged "
            f"download; delete that file and its link {hub.file} and run again")


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
    help_ = WEIGHTS_HELP.format(name=name, path=path, hub=hub_id(name))
    if weight_file is None:
        raise FileNotFoundError(
            f"'{path}' is a directory but holds neither model.safetensors nor pytorch_model.bin "
            f"(a Hugging Face nvidia/mit-b* download). {help_}")
    if not weight_file.is_file():
        raise FileNotFoundError(f"Pretrained weights for {name} not found at '{path}'. {help_}")
    return weight_file


def load_pretrained(model: MixVisionTransformer, path: str | Path,
                    name: str = "mit_b1") -> PretrainedWeights:
    """Load official ``mit_b*.pth`` weights, a Hugging Face ``nvidia/mit-b*`` directory or a hub
    id ``hf:nvidia/mit-b*[@revision]`` (:func:`hub_weight_file`), and return what was loaded: the
    source (a hub id pinned to its commit), the SHA-256 prefix of the weight file and the variant.

    Keys and shapes must match exactly once ``head.*`` is dropped. A missing file (or hub weights
    neither cached nor downloadable) raises FileNotFoundError with where the weights come from; any
    other unusable file raises :class:`WeightsError` with a one-line message naming the file, the
    model's variant ``name`` and what the file holds: another MiT variant (told from its shapes and
    block counts), a full AFA checkpoint, something else, or bytes torch cannot read.
    """
    own = model.state_dict()
    name = _mit_variant(own)[0] or name  # the variant built, should ``name`` disagree
    if _is_hub_spec(path):
        hub = hub_weight_file(str(path), name)
        digest = sha256_prefix(hub.file, digits=64)  # read once: checked, then recorded
        _check_blob(hub, digest)
        # Messages name the pinned id, which says which commit's file was read.
        source, weight_file, hf_layout, sha = hub.pinned, hub.file, True, digest[:12]
    else:
        path = Path(path)
        weight_file = _weight_file(path, name)
        source, hf_layout, sha = str(path), path.is_dir(), None
    state_dict = _read_weights(source, weight_file, name)
    if isinstance(state_dict, Mapping):
        state_dict = checkpoint_filter_fn(state_dict)
        if hf_layout:
            try:
                state_dict = convert_hf_mit_keys(state_dict)
            except KeyError as err:
                raise WeightsError(f"{source} holds Hugging Face weights that do not convert to "
                                   f"MiT names: {err.args[0]}") from err
    mismatch = _first_mismatch(own, state_dict) if isinstance(state_dict, Mapping) else None
    if isinstance(state_dict, Mapping) and mismatch is None:
        model.load_state_dict(state_dict, strict=True)
        return PretrainedWeights(source, sha or sha256_prefix(weight_file), name)
    if _is_hub_spec(source):
        right = f"{HUB_PREFIX}{hub_id(name)}"
    else:
        right = str(Path(source).parent / f"{name}.pth")
    raise _refusal(source, state_dict, name, mismatch, right)


def _refusal(source: str, state_dict, model_variant: str, mismatch: str | None,
             right: str) -> WeightsError:
    """The one-line error for weights that do not fit a ``model_variant`` encoder; ``right``: the
    model.pretrained that would hold the ``model_variant`` weights."""
    variant, what = _describe(state_dict)
    if variant == model_variant:  # the right variant, yet something differs (e.g. in_chans)
        return WeightsError(f"{source} holds {variant} weights that do not fit the "
                            f"{model_variant} encoder: {mismatch}")
    if variant:
        return WeightsError(
            f"{source} holds {variant} weights, but model.backbone is {model_variant}: set "
            f"model.backbone={variant} or model.pretrained={right}")
    return WeightsError(f"{source} holds {what}; model.pretrained wants the ImageNet MiT encoder "
                        f"weights {model_variant}.pth")
