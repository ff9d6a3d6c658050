"""The network settings of a trained checkpoint, for the tools that load one.

A checkpoint written by our trainer carries the merged config of its run (``state["config"]``, a
plain dict); the authors' checkpoints carry only a state dict. A tool that evaluates or runs a
checkpoint builds the network from ``--config``, so ``--config configs/voc.yaml`` (MiT-B1,
decoder width 256) with a checkpoint of a MiT-B0 run would fail to load.
:func:`model_config_from_checkpoint` returns the config with the checkpoint's network settings
instead, and says which ones it took.

The rule:

- ``MODEL_KEYS`` (backbone, decoder width, stage strides, pooling) describe the network alone:
  the checkpoint's saved value wins over the config file, and the returned note lists what was
  taken. The same key given on the command line with another value is an error, since that
  network cannot use these weights.
- ``data.name`` (the class list) also shapes the network, but it belongs to the data the tool
  reads (masks, class names, image labels): a checkpoint trained on other classes is an error,
  never silently adopted.
- ``model.pretrained`` becomes null: a checkpoint holds every weight, so evaluating one never
  needs (or looks for) the ImageNet MiT file.

Checkpoints without a saved config (the authors', or a bare state dict) change nothing but
``model.pretrained``; their shapes are checked when the weights are loaded.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from afa.config import ConfigError, num_classes, upgrade_saved_config
from afa.constants import CLASS_NAME_SETS
from afa.safe_load import CheckpointError, read_torch_file

__all__ = ["DATA_KEYS", "MATCHED_KEYS", "MODEL_KEYS", "CheckpointError", "CheckpointSettings",
           "model_config_from_checkpoint", "read_checkpoint"]

# Network settings a checkpoint's saved config decides (the keys of ``afa.config.model_kwargs``
# that matter once the weights are loaded; drop_path_rate does nothing in evaluation).
MODEL_KEYS = ("model.backbone", "model.embedding_dim", "model.stride", "model.pooling")
# Settings the network shares with the data (its classes, so the classifier's and the decoder's
# outputs): the checkpoint's value must equal the config's.
MATCHED_KEYS = ("data.name",)
# Where a run's data was: what evaluating its checkpoint should read (``data=True``).
DATA_KEYS = ("data.root", "data.list_dir", "data.mask_dir", "data.split_subdirs",
             "data.val_split")

_ABSENT = object()


class CheckpointSettings(NamedTuple):
    cfg: DictConfig  # read-only, like load_config's
    # {key: (value in the config, value taken from the checkpoint)} for every key that changed
    changed: dict[str, tuple[Any, Any]]
    note: str | None  # one line naming the checkpoint and the changed keys; None if none changed


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint read onto the CPU as data only (``afa.safe_load``), with errors that name
    the file: ``FileNotFoundError``, :class:`CheckpointError` (``UnsafeFileError`` for a file that
    holds code)."""
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint '{path}' holds a {type(state).__name__}, not a dict "
                              "of weights")
    return state


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _show(value) -> str:
    return "null" if value is None else str(value).replace(" ", "")


def _take_data(cfg: DictConfig, saved: dict, explicit: set, changed: dict) -> None:
    for key in DATA_KEYS:
        value, current = _lookup(saved, key), _plain(OmegaConf.select(cfg, key))
        if value is _ABSENT or value == current or key in explicit:
            continue
        if key in ("data.root", "data.list_dir") and not Path(str(value)).is_dir():
            continue  # the run's folder is not on this machine: the config's is the one
        changed[key] = (current, value)


def _take_classes(cfg: DictConfig, saved: dict, source: str, changed: dict) -> None:
    """A custom set's class names: the checkpoint's when the config has none (so a tool needs
    no class list of its own), else they must be the same names in the same order."""
    value = _lookup(saved, "data.classes")
    if value is _ABSENT or value is None:
        return
    current = _plain(OmegaConf.select(cfg, "data.classes"))
    if current is None:
        changed["data.classes"] = (None, list(value))
    elif list(current) != list(value):
        raise ConfigError(f"{source} was trained on the classes {list(value)}, but the config "
                          f"has {list(current)}: drop data.classes (the checkpoint's are used) or "
                          "give the same names in the same order")


def model_config_from_checkpoint(cfg: DictConfig, checkpoint: str | Path | dict,
                                 overrides=(), *, data: bool = False) -> CheckpointSettings:
    """``cfg`` with the network settings of ``checkpoint``'s saved config (see the module doc).

    Args:
        cfg: the merged config of ``load_config`` (not modified; a changed copy is returned).
        checkpoint: a checkpoint path, or the dict ``torch.load`` returned for it.
        overrides: the ``key=value`` strings the user gave on the command line; a network key
            among them that contradicts the checkpoint is a :class:`~afa.config.ConfigError`.
        data: also take where the run's data was (``DATA_KEYS``: root, lists, masks) from the
            checkpoint, so that evaluating a run's checkpoint scores the data it trained with,
            whatever ``--config`` says. A key given on the command line wins, and a saved
            folder that does not exist here keeps the config's; the note says which.

    Raises ``ConfigError`` (an override or ``data.name`` that contradicts the checkpoint),
    ``FileNotFoundError`` and :class:`CheckpointError` (a missing or unreadable file).

    Use in a tool, after the config is loaded and before the network is built::

        cfg = load_config(args.config, overrides)
        cfg, _, note = model_config_from_checkpoint(cfg, args.checkpoint, args.overrides)
        if note and is_main_process:
            print(note)
        model = AFANet(**C.model_kwargs(cfg))
        model.load_weights(args.checkpoint)

    (no ``model.pretrained=null`` override is needed any more).
    """
    source = "the given checkpoint"
    if not isinstance(checkpoint, dict):
        source = f"checkpoint '{checkpoint}'"
        checkpoint = read_checkpoint(checkpoint)
    saved = checkpoint.get("config")
    if isinstance(saved, dict):
        saved = upgrade_saved_config(saved)  # a checkpoint of an earlier version: today's keys
    explicit = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    changed = {}
    if isinstance(saved, dict):
        for key in MODEL_KEYS + MATCHED_KEYS:
            value = _lookup(saved, key)
            current = _plain(OmegaConf.select(cfg, key))
            if value is _ABSENT or value == current:
                continue
            if key in explicit:
                raise ConfigError(
                    f"{key}={_show(current)} was given on the command line, but {source} was "
                    f"trained with {key}={_show(value)} (its saved config): the network must "
                    f"be the checkpoint's; drop that override")
            if key in MATCHED_KEYS:
                trained = len(CLASS_NAME_SETS.get(value, ())) or "?"
                raise ConfigError(
                    f"{source} was trained on {key}={_show(value)} ({trained} classes), but the "
                    f"config's data is {key}={_show(current)} ({num_classes(cfg)} classes): use "
                    f"the config of the data the model was trained on, or {key}={_show(value)}")
            changed[key] = (current, value)
        _take_classes(cfg, saved, source, changed)
        if data:
            _take_data(cfg, saved, explicit, changed)
    new = copy.deepcopy(cfg)
    OmegaConf.set_readonly(new, False)
    for key, (_, value) in changed.items():
        OmegaConf.update(new, key, value, merge=False)
    new.model.pretrained = None  # the checkpoint holds every weight
    OmegaConf.set_readonly(new, True)
    note = None
    if changed:
        kind = "settings" if any(k.startswith("data.") for k in changed) else "network settings"
        note = (f"{source}: {kind} taken from its saved config (they differ from "
                "--config): " + ", ".join(f"{key}={_show(new_value)} (config: {_show(old)})"
                                          for key, (old, new_value) in changed.items()))
    return CheckpointSettings(new, changed, note)
