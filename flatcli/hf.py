"""Hugging Face ``save_pretrained`` folders as checkpoints.

A folder with a ``config.json`` (or the path of that file) loads through the transformers
class its config names under ``architectures`` (``BertForSequenceClassification``, ...),
the one its ``AutoModelFor…`` mapping would pick. Safe by default:

* weights are read from ``model.safetensors`` (or a sharded safetensors index) only,
  never from pickled ``pytorch_model.bin`` files;
* a config that needs custom code (``auto_map``, transformers' ``trust_remote_code``)
  loads only with ``trust_code=True`` (``--trust-code``);
* every weight of the architecture must be in the files (no silently random head).

transformers is an optional dependency: ``pip install "flatcli[hf]"``.

A ``flatcli.json`` beside ``config.json`` (written by ``flatcli finetune``) holds flatcli's
metadata (data, loss, hparams, parent_sha256), as the ``flatcli.*`` keys of its own files do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .errors import FlatcliError
from .io import file_in_folder, sha256_file

INSTALL_HINT = 'pip install "flatcli[hf]"'
FLATCLI_META = "flatcli.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


def config_path(path: str | Path) -> Path | None:
    """The ``config.json`` that ``path`` names (the file, or the folder holding it); else None."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p / "config.json"
    if p.is_file() and p.name == "config.json":
        return p
    return None


def require_transformers() -> Any:
    """Import transformers, or raise the install hint."""
    try:
        import transformers
    except ImportError:
        raise FlatcliError(
            f"loading a Hugging Face folder needs transformers: {INSTALL_HINT}"
        ) from None
    return transformers


def read_config(config: Path) -> dict[str, Any]:
    """The parsed ``config.json`` (or another JSON file of the folder): a regular file
    inside its folder, read within :mod:`flatcli.untrusted`'s limits, holding an object."""
    from .untrusted import read_json

    file_in_folder(config.parent, config.name, "file")
    obj = read_json(config, "file")
    if not isinstance(obj, dict):
        raise FlatcliError(f"{config} is not a JSON object")
    return obj


def load_pretrained(path: str | Path, *, trust_code: bool = False) -> tuple[nn.Module, str, dict]:
    """Load a ``save_pretrained`` folder.

    Args:
        path: The folder, or its ``config.json``.
        trust_code: Allow a config whose ``auto_map`` names custom modelling code.

    Returns:
        ``(model, sha256, metadata)``: the model in eval mode on the CPU, a sha256 over
        ``config.json`` and the weight files (name and content, sorted), and the
        ``flatcli.json`` metadata (empty when absent).

    Raises:
        FlatcliError: transformers missing, no safetensors weights, custom code without
            ``trust_code``, an unknown architecture, or weights that do not fit it.
    """
    config = config_path(path)
    if config is None:
        raise FlatcliError(f"{path} is not a Hugging Face folder (no config.json)")
    folder = config.parent
    cfg = read_config(config)
    custom = bool(cfg.get("auto_map"))
    if custom and not trust_code:
        raise FlatcliError(
            f"{folder.name}/config.json names custom model code (auto_map); importing it "
            "runs code from the folder: pass --trust-code only if you trust it"
        )
    weights = _weight_files(folder)
    transformers = require_transformers()
    cls = _model_class(transformers, cfg, folder, custom=custom)
    with _quiet_transformers(transformers):
        try:
            model, info = cls.from_pretrained(
                str(folder),
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=trust_code,
                output_loading_info=True,
            )
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            text = str(e).strip().splitlines()
            raise FlatcliError(
                f"cannot load {folder} with {cls.__name__}: {text[0] if text else type(e).__name__}"
            ) from None
    missing = [k for k in info.get("missing_keys", []) if k]
    mismatched = [
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])
    ]
    if missing or mismatched:
        what = "missing weights " + ", ".join(missing[:5]) if missing else ""
        if mismatched:
            what += ("; " if what else "") + "shape mismatch " + ", ".join(mismatched[:5])
        raise FlatcliError(
            f"{folder.name} does not hold all weights of {cls.__name__}: {what} "
            "(a head that was never trained? save the model with its head)"
        )
    return model.eval(), _folder_sha256(config, weights), _flatcli_metadata(folder)


def save_pretrained(model: nn.Module, folder: Path, metadata: Mapping[str, str]) -> Path:
    """Save a transformers model as a folder (safetensors) with ``flatcli.json``.

    Written to a temporary folder beside ``folder`` and renamed into place, so a reader
    sees the old folder or the complete new one (an old folder is replaced).
    """
    folder = Path(folder)
    parent = folder.parent if str(folder.parent) else Path(".")
    if not parent.is_dir():
        raise FlatcliError(f"cannot write {folder}: directory {parent} does not exist")
    if folder.exists() and not (folder / "config.json").is_file():
        raise FlatcliError(f"cannot write {folder}: it exists and is not a model folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    old = tmp.with_suffix(".old")
    try:
        with _quiet_transformers(require_transformers()):
            model.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
        (tmp / FLATCLI_META).write_text(json.dumps(dict(metadata), sort_keys=True, indent=1))
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as e:
        raise FlatcliError(f"cannot write {folder}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def check_has_head(model: nn.Module, folder: Path) -> None:
    """Refuse a bare encoder (``BertModel``, a sentence-embedding model): it returns hidden
    states, not logits, so it has no loss to be flat in. docs/models.md shows how to add
    and train a head."""
    if not is_pretrained_model(model):
        return
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", None) is not model:
        return  # a head wraps the base model under its prefix (BertFor… .bert)
    name = type(model).__name__
    raise FlatcliError(
        f"{folder} holds a bare {name}, without a head (a sentence-embedding model?): it "
        "returns hidden states, not logits. Add and train a head (for example "
        f"{name.removesuffix('Model')}ForSequenceClassification.from_pretrained on this "
        "folder, then flatcli finetune), save_pretrained the result, and measure that: "
        "docs/models.md#hugging-face-folders"
    )


def is_pretrained_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (has ``save_pretrained`` and a config)."""
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def _weight_files(folder: Path) -> list[Path]:
    found = [folder / n for n in _WEIGHTS if os.path.lexists(folder / n)]
    if found:
        index = folder / "model.safetensors.index.json"
        if os.path.lexists(index):
            shards = read_config(index).get("weight_map", {})
            names = {str(s) for s in shards.values()} if isinstance(shards, dict) else {""}
            for name in names:  # a shard is a file in this folder, never a path elsewhere
                file_in_folder(folder, name, "weight shard")
            return sorted({folder / n for n in names} | {index})
        return [file_in_folder(folder, f.name, "weight file") for f in found]
    pickled = [n for n in _PICKLED if (folder / n).is_file()]
    if pickled:
        raise FlatcliError(
            f"{folder.name} has weights only as {pickled[0]}, a pickle that could run code "
            "when loaded; flatcli reads safetensors only: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise FlatcliError(f"{folder.name} has no model.safetensors")


def _model_class(transformers: Any, cfg: Mapping[str, Any], folder: Path, *, custom: bool) -> Any:
    """The class ``architectures[0]`` names; with custom code, the Auto class mapped to it."""
    archs = cfg.get("architectures") or []
    name = archs[0] if archs and isinstance(archs[0], str) else None
    if custom:
        auto_map = cfg["auto_map"]
        for auto_name, target in auto_map.items():
            if name is None or str(target).rsplit(".", 1)[-1] == name:
                auto = getattr(transformers, auto_name, None)
                if auto is not None and auto_name != "AutoConfig":
                    return auto
    if name is None:
        raise FlatcliError(f"{folder.name}/config.json names no architectures")
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise FlatcliError(
            f"{folder.name}/config.json names architecture {name!r}, which this transformers "
            f"({transformers.__version__}) does not have"
        )
    return cls


@contextmanager
def _quiet_transformers(transformers: Any):  # noqa: ANN202 - generator context manager
    """No load reports or progress bars: flatcli checks the load and raises its own errors."""
    log = logging.getLogger("transformers")
    level = log.level
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def folder_sha256(folder: Path) -> str:
    """The sha256 :func:`load_pretrained` reports for a folder."""
    config = file_in_folder(folder, "config.json", "file")
    return _folder_sha256(config, _weight_files(folder))


def _folder_sha256(config: Path, weights: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted([config, *weights]):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def _flatcli_metadata(folder: Path) -> dict[str, str]:
    meta = folder / FLATCLI_META
    if not os.path.lexists(meta):
        return {}
    obj = read_config(meta)
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}
