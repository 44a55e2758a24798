"""Safe loading and saving of model checkpoints.

Safe by default: ``.safetensors`` files and ``torch.load(weights_only=True)`` state
dicts never execute code. Whole pickled modules, TorchScript archives and
``torch.export`` ``.pt2`` programs do, so they load only with ``trust_code=True``
(``--trust-code``). An architecture named in a file's metadata is followed only when it
is exactly ``flatcli.archs:<name>`` for a name in :data:`flatcli.archs.BUILDERS`; anything
else is the user's choice (``--arch``) or needs ``trust_code``, and a metadata spec that
names a file is never followed. Zip archives are checked for decompression bombs first.

flatcli's own checkpoints carry string metadata under ``flatcli.*`` keys:
``arch`` (``module:callable``), ``arch_kwargs`` (JSON), ``data``, ``loss``,
``input_shape`` (JSON list), ``hparams`` (JSON object), ``parent_sha256``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FlatcliError, UsageError, warn
from .io import atomic_write, check_archive_size, check_regular_file, is_stream, sha256_file

SAFE_ARCH_PREFIX = "flatcli.archs:"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_WRAPPERS = 8
"""Most levels of ``{"state_dict": {...}}`` wrapping unpacked (a cyclic file has no end)."""
META_KEYS = ("arch", "arch_kwargs", "data", "loss", "input_shape", "hparams", "parent_sha256")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model with where it came from.

    Attributes:
        model: The module, in eval mode, on the CPU.
        path: The file (or Hugging Face folder) it was loaded from.
        sha256: Hex sha256 of that file (of a folder: over its config and weight files).
        format: ``safetensors``, ``state_dict``, ``pickle``, ``torchscript``, ``export`` or
            ``huggingface``.
        metadata: ``flatcli.*`` metadata without the prefix (strings).
    """

    model: nn.Module
    path: Path
    sha256: str
    format: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def hparams(self) -> dict[str, Any]:
        """Hyperparameters recorded in the metadata (empty when none)."""
        value = _json_or(self.metadata.get("hparams"), {}, "hparams")
        if not isinstance(value, dict):
            raise FlatcliError("checkpoint metadata flatcli.hparams is not a JSON object")
        return value

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Per-sample input shape recorded in the metadata, if any."""
        shape = _json_or(self.metadata.get("input_shape"), None, "input_shape")
        if shape is None or shape == []:
            return None
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
        ):
            raise FlatcliError(
                "checkpoint metadata flatcli.input_shape must be a JSON list of positive "
                f"integers, got {_short(self.metadata['input_shape'])}"
            )
        return tuple(shape)


def _short(text: str, k: int = 40) -> str:
    return repr(text if len(text) <= k else text[:k] + "…")


def _json_or(text: str | None, default: Any, what: str) -> Any:
    if text is None:
        return default
    from .untrusted import parse_json

    return parse_json(text, f"checkpoint metadata flatcli.{what}")


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    data: str | None = None,
    loss: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    hparams: Mapping[str, Any] | None = None,
    parent_sha256: str | None = None,
) -> Path:
    """Atomically save ``model`` as a flatcli checkpoint (``.safetensors`` or ``.pt``).

    The metadata makes the file loadable with no flags when ``arch`` is one of
    :mod:`flatcli.archs`. Tied (shared) tensors are stored once.
    """
    meta = {"arch": arch, "arch_kwargs": json.dumps(dict(arch_kwargs or {}), sort_keys=True)}
    if data is not None:
        meta["data"] = data
    if loss is not None:
        meta["loss"] = loss
    if input_shape is not None:
        meta["input_shape"] = json.dumps(list(input_shape))
    if hparams is not None:
        meta["hparams"] = json.dumps(dict(hparams), sort_keys=True)
    if parent_sha256 is not None:
        meta["parent_sha256"] = parent_sha256
    state = _dedup_state(model)
    path = Path(path)
    suffix = path.suffix if path.suffix in (".safetensors", ".pt", ".pth") else None
    if suffix is None and is_stream(path):  # /dev/stdout, a FIFO: no name to go by
        suffix = ".safetensors"
    if suffix == ".safetensors":
        from safetensors.torch import save

        md = {f"flatcli.{k}": v for k, v in meta.items()}
        blob = _canonical_header(save(state, metadata=md))
        return atomic_write(path, lambda p: p.write_bytes(blob))
    if suffix in (".pt", ".pth"):
        obj = {"state_dict": state, "flatcli": meta}
        return atomic_write(path, lambda p: torch.save(obj, p))
    raise UsageError(f"cannot save to {path.name}: use a .safetensors or .pt file name")


def _canonical_header(blob: bytes) -> bytes:
    """The same safetensors bytes with ``__metadata__`` keys sorted, so saves are reproducible.

    safetensors serializes metadata from a hash map, whose order differs between runs; the
    sorted header has the same length (padding with spaces, which the format allows).
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen for a reordering; never write a broken file
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n :]


def _dedup_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen and t.numel():
            continue
        seen.add(key)
        state[name] = t.detach().contiguous().clone()
    return state


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
) -> Checkpoint:
    """Load a model checkpoint safely.

    Args:
        path: ``.safetensors``, ``.pt``/``.pth``/``.bin`` (state dict, pickled module or
            TorchScript), ``.pt2`` (``torch.export``), or a Hugging Face
            ``save_pretrained`` folder (or its ``config.json``; see :mod:`flatcli.hf`).
        arch: ``package.module:callable`` or ``path/to/file.py:callable`` that builds the
            module; default: the file's ``flatcli.arch`` metadata.
        arch_kwargs: Keyword arguments for ``arch`` (default: the metadata's).
        trust_code: Allow formats whose loading runs code from the file, and
            architectures named by the file outside :mod:`flatcli.archs`.

    Raises:
        FlatcliError: Missing, corrupt or unsafe file, unknown architecture, or weights
            that do not fit the architecture.
    """
    path = Path(path).expanduser()
    from .hf import config_path

    config = config_path(path)
    if config is not None:
        if arch is not None or arch_kwargs is not None:
            raise UsageError(
                f"{path.name} is a Hugging Face folder: its config.json names the "
                "architecture, so --arch and --arch-kwargs do not apply"
            )
        from .hf import load_pretrained

        model, sha, meta = load_pretrained(config, trust_code=trust_code)
        return Checkpoint(
            model=model, path=config.parent, sha256=sha, format="huggingface", metadata=meta
        )
    if path.is_dir():
        raise FlatcliError(f"{path} is a folder without config.json (not a Hugging Face model)")
    path = check_regular_file(path, "checkpoint")
    sha = sha256_file(path)
    suffix = path.suffix.lower()
    state: dict[str, torch.Tensor] | None = None
    if suffix == ".safetensors":
        shapes, meta = _safetensors_header(path)
        fmt = "safetensors"
    elif suffix == ".pt2":
        return _load_trusted(path, sha, "export", trust_code)
    elif _is_torchscript(path):
        return _load_trusted(path, sha, "torchscript", trust_code)
    else:
        obj = _torch_load_weights_only(path, trust_code)
        if isinstance(obj, nn.Module):
            return Checkpoint(model=obj.eval(), path=path, sha256=sha, format="pickle")
        state, meta = _unwrap_state_dict(obj, path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        fmt = "state_dict"
    model = build_model(arch, arch_kwargs, meta, trust_code=trust_code, path=path, shapes=shapes)
    if state is None:
        state, _ = _read_safetensors(path)
    load_state(model, state, path)
    return Checkpoint(model=model.eval(), path=path, sha256=sha, format=fmt, metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """A checkpoint's ``flatcli.*`` metadata without building the model (empty when it has
    none, or cannot be read safely: loading it reports why)."""
    path = Path(path)
    try:
        from .hf import _flatcli_metadata, config_path

        config = config_path(path)
        if config is not None:
            return _flatcli_metadata(config.parent)
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
            return {k.removeprefix("flatcli."): v for k, v in raw.items() if k[:8] == "flatcli."}
        if path.suffix.lower() == ".pt2" or _is_torchscript(path):
            return {}
        check_archive_size(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception:  # noqa: BLE001 - unreadable here means: no metadata to follow
        return {}
    try:
        return _pickled_metadata(obj, path)
    except FlatcliError:
        return {}


def _pickled_metadata(obj: Any, path: Path) -> dict[str, str]:
    """The ``flatcli`` entry of a loaded ``.pt`` file: names and values are strings (as
    :func:`save_checkpoint` writes them); anything else is refused, never converted (the
    text of a crafted container can be astronomically long)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("flatcli"), dict):
        return {}
    meta = obj["flatcli"]
    strings = (isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    bad = next((k for k, ok in zip(meta, strings, strict=True) if not ok), None)
    if bad is not None:
        shown = bad if isinstance(bad, str) else type(bad).__name__
        raise FlatcliError(f"{path.name}: metadata flatcli.{shown[:40]} is not a string")
    return dict(meta)


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and ``flatcli.*`` metadata of a safetensors file, from its header
    alone (nothing is allocated for the tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - the library raises several types on corrupt files
        raise FlatcliError(f"{path} is not a valid safetensors file ({_first_line(e)})") from None
    meta = {k.removeprefix("flatcli."): v for k, v in raw.items() if k.startswith("flatcli.")}
    return shapes, meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except Exception as e:  # noqa: BLE001 - the library raises several types on corrupt files
        raise FlatcliError(f"{path} is not a valid safetensors file ({_first_line(e)})") from None
    meta = {k.removeprefix("flatcli."): v for k, v in raw.items() if k.startswith("flatcli.")}
    return state, meta


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) or any(
        n.endswith("constants.pkl") for n in names
    )


def _torch_load_weights_only(path: Path, trust_code: bool) -> Any:
    check_archive_size(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_code:
            raise FlatcliError(
                f"{path.name} contains pickled Python objects (for example a whole nn.Module); "
                "loading it could run code: pass --trust-code only if you trust the file, "
                "or save a state_dict / safetensors instead"
            ) from None
        del e
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        raise FlatcliError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise FlatcliError(f"cannot read checkpoint {path}: {_first_line(e)}") from None


def _load_trusted(path: Path, sha: str, fmt: str, trust_code: bool) -> Checkpoint:
    what = {"export": "a torch.export program", "torchscript": "a TorchScript archive"}[fmt]
    if not trust_code:
        raise FlatcliError(
            f"{path.name} is {what}; loading it runs code from the file: "
            "pass --trust-code only if you trust it"
        )
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; the user opted in
            warnings.simplefilter("ignore", DeprecationWarning)
            if fmt == "export":
                model = torch.export.load(str(path)).module()
            else:
                model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise FlatcliError(f"cannot load {what} from {path}: {_first_line(e)}") from None
    return Checkpoint(model=eval_mode(model), path=path, sha256=sha, format=fmt)


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()``, except for exported programs, whose mode was fixed at export."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def _unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .untrusted import check_tensors

    meta = _pickled_metadata(obj, path)
    check_tensors(obj, path.name)
    for _ in range(_MAX_WRAPPERS):
        if not isinstance(obj, dict) or _is_tensor_dict(obj):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise FlatcliError(
                f"{path.name} holds no state dict (looked for tensors at the top "
                f"level and under {', '.join(_WRAPPER_KEYS)})"
            )
        obj = inner
    if not isinstance(obj, dict) or not obj or not _is_tensor_dict(obj):
        raise FlatcliError(f"{path.name} holds no state dict")
    if not all(isinstance(k, str) for k in obj):
        raise FlatcliError(f"{path.name}: its state dict has keys that are not names")
    state = {}
    for k, v in obj.items():
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix) :]
        state[k] = v
    return state, meta


def _is_tensor_dict(d: dict[Any, Any]) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def resolve_arch(spec: str) -> Any:
    """Import the callable named by ``module:callable`` or ``file.py:callable``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"--arch must look like package.module:callable or "
            f"path/to/file.py:callable, got {spec!r}"
        )
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise FlatcliError(f"architecture file not found: {file}")
            mod_spec = importlib.util.spec_from_file_location(f"_flatcli_arch_{file.stem}", file)
            if mod_spec is None or mod_spec.loader is None:
                raise FlatcliError(f"cannot import {file}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except FlatcliError:
        raise
    except Exception as e:  # noqa: BLE001 - user code may raise anything on import
        raise FlatcliError(
            f"cannot import architecture module {module_name}: {_first_line(e)}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise FlatcliError(f"{module_name} has no callable {attr!r}")
    return fn


def is_safe_arch(spec: str) -> bool:
    """Whether ``spec`` is exactly ``flatcli.archs:<name>`` for a builder in
    :data:`flatcli.archs.BUILDERS`: the only architectures followed from metadata unasked."""
    from .archs import BUILDERS

    return spec.startswith(SAFE_ARCH_PREFIX) and spec[len(SAFE_ARCH_PREFIX) :] in BUILDERS


def _safe_builder(spec: str) -> Any:
    if not is_safe_arch(spec):
        return None
    from . import archs

    return getattr(archs, spec[len(SAFE_ARCH_PREFIX) :])


def check_metadata_arch(spec: str, path: Path, *, trust_code: bool) -> None:
    """Refuse an architecture named by a file unless it is one of flatcli's own builders.

    A spec that names a file (``x.py:fn``, anything with a path separator) is refused even
    with ``trust_code``: a file name in metadata would resolve against the working
    directory, which the checkpoint's author does not control. Other modules need
    ``trust_code``.

    Raises:
        FlatcliError: The spec is not allowed.
    """
    if is_safe_arch(spec):
        return
    module = spec.rpartition(":")[0]
    if any(c in spec for c in "/\\") or module.endswith(".py") or spec.startswith(("~", ".")):
        raise FlatcliError(
            f"{path.name} names a file as its architecture ({_short(spec)}); flatcli never "
            "imports a file named by a checkpoint: pass --arch yourself"
        )
    if not trust_code:
        raise FlatcliError(
            f"{path.name} names architecture {_short(spec)}, which is not one of "
            "flatcli's; importing it runs code: pass --arch yourself, or "
            "--trust-code if you trust the file"
        )


def build_model(
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    meta: Mapping[str, str],
    *,
    trust_code: bool,
    path: Path,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> nn.Module:
    """Build the module a state dict belongs to (see :func:`load_checkpoint`).

    With ``shapes`` (the file's tensor shapes, e.g. from a safetensors header) the module
    is first built on the ``meta`` device, which allocates nothing, and its weights'
    shapes are compared with the file's: architecture arguments that do not fit the file
    (``hidden: [200000, 200000]``) are an error before any memory is taken.
    """
    if arch is None:
        arch = meta.get("arch")
        if arch is None:
            raise UsageError(
                f"{path.name} holds only weights: say which architecture to build "
                "with --arch package.module:callable (and --arch-kwargs JSON)"
            )
        check_metadata_arch(arch, path, trust_code=trust_code)
    if arch_kwargs is None:
        arch_kwargs = _json_or(meta.get("arch_kwargs"), {}, "arch_kwargs")
        if not isinstance(arch_kwargs, Mapping):
            raise FlatcliError("checkpoint metadata flatcli.arch_kwargs is not a JSON object")
    if not isinstance(arch_kwargs, Mapping):
        raise UsageError("--arch-kwargs must be a JSON object")
    fn = _safe_builder(arch) or resolve_arch(arch)
    if shapes is not None:
        _check_shapes_on_meta(fn, arch_kwargs, shapes, path)
    try:
        model = fn(**arch_kwargs)
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        shown = _short(str(dict(arch_kwargs)), 200)
        raise FlatcliError(f"{arch}(**{shown}) failed: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise FlatcliError(f"{arch} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_shapes_on_meta(
    fn: Any, arch_kwargs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], path: Path
) -> None:
    """Build the module on the ``meta`` device and check it fits the file's shapes.

    A builder that cannot run on ``meta`` (one that computes with its weights) is
    skipped here; :func:`load_state` then checks the shapes after building.
    """
    try:
        with torch.device("meta"):
            probe = fn(**arch_kwargs)
    except Exception:  # noqa: BLE001 - not buildable on meta: checked after the real build
        return
    if isinstance(probe, nn.Module):
        _check_fit(probe, shapes, path)


def _check_fit(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Every weight of ``model`` in ``shapes`` with its shape, and nothing else there."""
    expected = model.state_dict()
    aliases = _tied_aliases(model)
    missing = [k for k in expected if k not in shapes and not (aliases.get(k, set()) & set(shapes))]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [
        f"{k} {tuple(shapes[k])} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise FlatcliError(f"{path.name} does not fit the architecture: " + "; ".join(problems))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model``, with a readable error for any mismatch."""
    _check_fit(model, {k: tuple(v.shape) for k, v in state.items()}, path)
    expected = model.state_dict()
    aliases = _tied_aliases(model)
    _check_dtypes(expected, state, path)
    full = dict(state)
    for k in expected:
        if k not in full:
            full[k] = state[next(iter(aliases[k] & set(state)))]
    model.load_state_dict(full, strict=True)


def _check_dtypes(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: Path
) -> None:
    """Refuse integer or boolean weights where the model has floats; say when half-precision
    weights are cast up (loading copies them into the model's own dtype)."""
    wrong = [
        f"{k} ({str(state[k].dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if wrong:
        raise FlatcliError(
            f"{path.name} stores non-float values for floating-point weights: {_few(wrong)}"
        )
    cast = sorted(
        {
            str(state[k].dtype).removeprefix("torch.")
            for k, v in expected.items()
            if k in state
            and state[k].dtype in (torch.float16, torch.bfloat16)
            and state[k].dtype != v.dtype
        }
    )
    if cast:
        to = next(v.dtype for v in expected.values() if v.is_floating_point())
        warn(
            f"{path.name} stores {', '.join(cast)} weights; they are cast to "
            f"{str(to).removeprefix('torch.')}"
        )


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {n: g - {n} for g in groups.values() for n in g}


def _few(items: list[str], k: int = 5) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" (+{len(items) - k} more)" if len(items) > k else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_finite(model: nn.Module) -> None:
    """Raise a clear error when any parameter or buffer holds NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FlatcliError(f"the checkpoint's {name} contains NaN or Inf values")
