"""Measure many checkpoints and ask which measure predicts their generalization gap.

The experiment of Petzka et al. (2021), Fig. 5, and Jiang et al. (2020), as one function.

Reliability:

* Every checkpoint's result is cached as one JSON file, keyed by the checkpoint's sha256,
  the sha256 of its data file (for a bundled set, of the bundled file) and the measure
  configuration, and written atomically. An entry is checked against the result schema
  when read; a damaged one is measured again, with a warning. An interrupted run, rerun with the
  same arguments, recomputes only what is missing and yields the same table.
* A checkpoint that cannot be loaded or measured is reported and skipped; the others go on.
* ``jobs > 1`` measures checkpoints in worker processes (one CUDA device each, round robin,
  when several are visible). Each worker's result is cached as soon as it is done. Ctrl-C
  stops the workers at once; the results cached so far are kept.
* Under ``torchrun`` (:mod:`flatcli.distributed`) each rank measures every ``world``-th
  uncached checkpoint and every rank receives all rows (rank 0 writes the outputs).
* A zoo of different widths: the ``--hparams`` CSV's ``arch.<kwarg>`` columns give each
  checkpoint its own architecture arguments (:func:`arch_kwargs_table`).

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import FlatcliError, UsageError, warn
from .io import atomic_write_text, file_in_folder, sha256_file
from .registry import MeasureOptions

DEFAULT_MEASURES = (
    "relative_flatness",
    "relative_flatness_normalized",
    "layer_hessian_trace",
    "fisher_rao",
    "pacbayes_flatness",
    "weight_norm",
)
"""Petzka et al.'s Fig. 5 comparison."""

CACHE_VERSION = 2
MAX_ENTRY_BYTES = 1 << 20
"""Largest cache entry read (a real one is a few hundred bytes plus its hyperparameters)."""
_ROW_KEYS = (
    "sha256",
    "layer",
    "n_train",
    "n_test",
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "hparams",
)


@dataclass(frozen=True)
class CorrelateConfig:
    """What each checkpoint is measured with; all of it is part of the cache key.

    Attributes:
        measures: Measure names (see :mod:`flatcli.registry`).
        layer: Feature layer (None: each model's last ``nn.Linear``).
        data: Data spec (None: each checkpoint's metadata).
        target, max_samples, batch_size, loss, device, dtype: As for ``flatcli measure``.
        options: The measures' own options (:class:`~flatcli.registry.MeasureOptions`).
        arch, arch_kwargs, trust_code: Loading options.
    """

    measures: tuple[str, ...] = DEFAULT_MEASURES
    layer: str | None = None
    data: str | None = None
    target: str | None = None
    max_samples: int | None = None
    batch_size: int = 256
    loss: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    options: MeasureOptions = field(default_factory=MeasureOptions)
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] | None = None
    trust_code: bool = False

    def key(self) -> str:
        """Hash of everything that changes a result (not the device or batch size)."""
        d = asdict(self)
        for volatile in ("device", "batch_size"):
            d.pop(volatile)
        d["arch_kwargs"] = dict(d["arch_kwargs"] or {})
        d["cache_version"] = CACHE_VERSION
        text = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CorrelateRun:
    """The outcome of :func:`measure_checkpoints`.

    Attributes:
        rows: One dict per measured checkpoint (measures, losses, accuracies, hparams).
        skipped: ``{"checkpoint", "reason"}`` for each checkpoint that failed.
        computed: How many checkpoints were measured now (the rest came from the cache).
        data_sha256: The sha256 of each data file used (bundled sets: of the bundled file),
            by data spec; part of every cache key, and of the run's manifest.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    computed: int = 0
    data_sha256: dict[str, str] = field(default_factory=dict)


def measure_checkpoints(
    paths: Sequence[str | Path],
    config: CorrelateConfig,
    *,
    cache_dir: str | Path,
    jobs: int = 1,
    on_result: Callable[[str, str], None] | None = None,
    threads: int | None = None,
    arch_kwargs_for: Mapping[str, Mapping[str, Any]] | None = None,
) -> CorrelateRun:
    """Measure every checkpoint (train split) and evaluate it on train and test.

    Args:
        paths: Checkpoint files (or Hugging Face folders).
        config: Measure configuration, shared by all checkpoints.
        arch_kwargs_for: Architecture arguments by checkpoint file name (see
            :func:`arch_kwargs_table`), merged over ``config.arch_kwargs`` for that
            checkpoint only (and part of its cache key).
        cache_dir: Directory of the per-checkpoint cache (created if missing).
        jobs: Worker processes (each reused for many checkpoints, so torch is imported
            once per worker).
        threads: Intra-op threads of each worker (default 1: ``jobs`` workers on
            ``jobs`` cores; more oversubscribes them).
        on_result: Called with ``(checkpoint, status)`` as each finishes; status is
            ``cached``, ``computed`` or ``skipped: reason``.

    Returns:
        The rows in the order of ``paths``.
    """
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if not paths:
        raise UsageError("no checkpoints given")
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatcliError(f"cannot create cache directory {cache}: {e.strerror}") from None
    note = on_result or (lambda _c, _s: None)
    run = CorrelateRun()
    results: dict[int, dict[str, Any] | str] = {}
    todo: list[tuple[int, str, Path]] = []
    configs: dict[int, CorrelateConfig] = {}
    data_shas: dict[tuple[str, str], str] = {}
    for i, p in enumerate(paths):
        path = Path(p)
        sha = _checkpoint_sha256(path)
        if sha is None:
            results[i] = f"not found: {path}"
            note(str(path), f"skipped: {results[i]}")
            continue
        own = (arch_kwargs_for or {}).get(path.name)
        configs[i] = (
            config
            if own is None
            else replace(config, arch_kwargs={**(config.arch_kwargs or {}), **own})
        )
        spec, data_sha = _data_of(path, config, data_shas)
        if spec is not None and data_sha is not None:
            run.data_sha256[spec] = data_sha
        entry = cache / f"{sha}-{configs[i].key()}-{(data_sha or 'nodata')[:16]}.json"
        if os.path.lexists(entry):  # whatever is there: read_cache_entry says what it is
            row, problem = read_cache_entry(entry, configs[i], sha)
            if row is not None:
                results[i] = {"checkpoint": path.name, "path": str(path), **row}
                note(str(path), "cached")
                continue
            warn(f"cache entry {entry.name} of {path.name} is damaged ({problem}); measuring again")
        todo.append((i, str(path), entry))
    from . import distributed

    # Under torchrun, rank r measures every world-th checkpoint; every rank gets all rows.
    # Rank 0's list decides (the gather is also a barrier: no rank writes a cache entry
    # before every rank has read the cache).
    shared = distributed.gather([[i, path, str(entry)] for i, path, entry in todo])[0]
    todo = [(int(i), str(path), Path(entry)) for i, path, entry in shared]
    mine = todo[distributed.rank() :: distributed.world_size()]
    with contextlib.closing(_run(mine, configs, jobs, note, threads)) as outcomes:
        local = [[i, outcome] for i, outcome in outcomes]
    for part in distributed.gather(local):
        for i, outcome in part:
            results[i] = outcome
            if isinstance(outcome, dict):
                run.computed += 1
    for i, p in enumerate(paths):
        outcome = results[i]
        if isinstance(outcome, dict):
            run.rows.append(outcome)
        else:
            run.skipped.append({"checkpoint": str(p), "reason": outcome})
    return run


def _data_of(
    path: Path, config: CorrelateConfig, memo: dict[tuple[str, str], str]
) -> tuple[str | None, str | None]:
    """The data spec a checkpoint is measured on and its content sha256 (None: unknown,
    the measurement itself then reports why)."""
    from .checkpoints import read_metadata
    from .data import data_sha256, metadata_data
    from .hf import config_path

    hf_config = config_path(path)
    ck_path = hf_config.parent if hf_config is not None else path  # as Checkpoint.path
    try:
        if config.data is not None:
            spec, base = config.data, ck_path.parent
        else:
            named = read_metadata(path).get("data")
            if named is None:
                return None, None
            spec, base = metadata_data(named, ck_path), None
        resolved = str(Path(spec).expanduser().resolve()) if Path(spec).exists() else spec
        key = (resolved, str(base))
        if key not in memo:
            memo[key] = data_sha256(spec, base_dir=base)
        return spec, memo[key]
    except (FlatcliError, OSError):
        return None, None


def read_cache_entry(
    entry: Path, config: CorrelateConfig, sha256: str
) -> tuple[dict[str, Any] | None, str]:
    """A cached result, checked against the result schema and the ranges of its values.

    An entry that is not a regular file (a link, a FIFO, a device, a directory) is never
    opened; one larger than :data:`MAX_ENTRY_BYTES` is never read.

    Returns:
        ``(row, "")`` for a valid entry, else ``(None, reason)``.
    """
    from .io import BadInput
    from .untrusted import read_json

    try:
        row = read_json(entry, "cache entry", max_bytes=MAX_ENTRY_BYTES, follow_links=False)
    except BadInput as e:
        return None, e.reason
    problem = _row_problem(row, config, sha256)
    return (None, problem) if problem else (row, "")


def _row_problem(row: Any, config: CorrelateConfig, sha256: str) -> str:
    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not a result"
    missing = [k for k in _ROW_KEYS if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    allowed = set(_ROW_KEYS) | {m + s for m in config.measures for s in ("", "_stderr")}
    extra = [k for k in row if k not in allowed]
    if extra:
        return f"unexpected {', '.join(map(str, extra[:3]))}"
    if row["sha256"] != sha256:
        return "another checkpoint's result"
    if not isinstance(row["layer"], str) or not isinstance(row["hparams"], dict):
        return "wrong types"
    counts = (row["n_train"], row["n_test"])
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        return "sample counts are not positive integers"
    bad = [k for k in row if k not in ("sha256", "layer", "hparams") and not number(row[k])]
    if bad:
        return f"non-numeric {', '.join(bad[:3])}"
    return _range_problem(row)


def _range_problem(row: Mapping[str, Any]) -> str:
    """What no measurement can produce: a non-finite number, a negative loss or standard
    error, an accuracy outside [0, 1]."""
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    bad = [k for k, v in numbers.items() if not math.isfinite(v)]
    if bad:
        return f"non-finite {', '.join(bad[:3])}"
    negative = [
        k
        for k in ("train_loss", "test_loss", *(k for k in row if k.endswith("_stderr")))
        if isinstance(row[k], (int, float)) and row[k] < 0
    ]
    if negative:
        return f"negative {', '.join(negative[:3])}"
    outside = [
        k
        for k in ("train_acc", "test_acc")
        if row[k] is not None and not 0 <= row[k] <= 1
    ]
    if outside:
        return f"{', '.join(outside)} outside [0, 1]"
    return ""


def _checkpoint_sha256(path: Path) -> str | None:
    """The file's sha256, or a Hugging Face folder's (see :mod:`flatcli.hf`); None if absent."""
    if path.is_file() and path.name != "config.json":
        return sha256_file(path)
    from .hf import config_path, folder_sha256

    config = config_path(path)
    if config is None:
        return None
    try:
        return folder_sha256(config.parent)
    except FlatcliError:  # no usable weights (or a file outside): loading will report why
        with contextlib.suppress(FlatcliError):
            return sha256_file(file_in_folder(config.parent, config.name, "file"))
        return hashlib.sha256(str(config).encode()).hexdigest()


def arch_kwargs_table(path: str | Path) -> dict[str, dict[str, Any]]:
    """Per-checkpoint architecture arguments from a hyperparameter CSV.

    Columns named ``arch.<kwarg>`` give ``<kwarg>`` for that row's checkpoint (the
    ``checkpoint``, ``file`` or ``path`` column, matched by file name). A cell is parsed as
    JSON (``64`` → 64, ``[32, 32]`` → a list, ``true``), else kept as text; an empty cell
    leaves the argument out.

    Returns:
        ``{file name: {kwarg: value}}`` for the rows with at least one argument.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FlatcliError(f"hyperparameter table not found: {path}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((c for c in ("checkpoint", "file", "path") if c in table.columns), None)
    arch_cols = [c for c in table.columns if c.startswith("arch.") and len(c) > len("arch.")]
    if not arch_cols:
        return {}
    if key is None:
        raise FlatcliError(f"{path} needs a 'checkpoint' column with the checkpoint file names")
    out: dict[str, dict[str, Any]] = {}
    for _, row in table.iterrows():
        kwargs = {c.removeprefix("arch."): _cell(row[c]) for c in arch_cols if row[c].strip()}
        if kwargs:
            out[Path(str(row[key])).name] = kwargs
    return out


def _cell(text: str) -> Any:
    from .io import BadInput
    from .untrusted import parse_json

    try:
        return parse_json(text, "a cell")
    except BadInput:  # not JSON (or too deep for it): the text itself
        return text


def _run(
    todo: list[tuple[int, str, Path]],
    configs: Mapping[int, CorrelateConfig],
    jobs: int,
    note: Callable[[str, str], None],
    threads: int | None = None,
):  # noqa: ANN202 - generator of (index, outcome)
    first = next(iter(configs.values()), None)
    devices = _devices(first.device if first else "cpu", jobs)
    if jobs == 1 or len(todo) <= 1:
        for i, path, entry in todo:
            outcome = _measure_and_cache(path, entry, configs[i], devices[0])
            note(path, "computed" if isinstance(outcome, dict) else f"skipped: {outcome}")
            yield i, outcome
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_init,
        initargs=(threads or 1, _memory_share(jobs, devices)),
    )
    try:
        futures = {
            pool.submit(_worker_task, path, entry, configs[i], devices[k % len(devices)]): (
                i,
                path,
            )
            for k, (i, path, entry) in enumerate(todo)
        }
        for future in as_completed(futures):
            i, path = futures[future]
            outcome = future.result()
            note(path, "computed" if isinstance(outcome, dict) else f"skipped: {outcome}")
            yield i, outcome
    except BaseException:  # Ctrl-C (or a failure): stop now, not after the queue drains
        _stop(pool)
        raise
    pool.shutdown(wait=True)


def _stop(pool: Any) -> None:
    """Cancel what has not started and end the workers; what they cached stays cached.

    The workers ignore SIGINT and SIGHUP (the terminal sends them to the whole process
    group; the parent's SIGTERM and SIGHUP end here too, see
    :func:`flatcli.cli.common.termination_signals`) and turn SIGTERM into an exit that
    removes a half-written cache file.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()


def _memory_share(jobs: int, devices: Sequence[str]) -> int:
    """How many workers share one device's memory (workers go round robin over devices)."""
    return -(-jobs // len(devices))


def _share_memory(share: int) -> None:
    """A worker's default ``max_memory`` (once, in a fresh worker process): its share of the
    default fraction of free memory, so that workers side by side do not each plan for half
    of the same memory."""
    from .measures import budget

    budget.DEFAULT_MEMORY_FRACTION /= share


def _worker_init(threads: int = 1, share: int = 1) -> None:
    import signal
    import warnings

    import torch

    from .errors import FlatcliWarning
    from .text import show_warning

    warnings.showwarning = show_warning
    warnings.simplefilter("always", FlatcliWarning)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(threads)
    _share_memory(share)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")


class _Terminated(BaseException):
    """SIGTERM in a worker: unwinds the running task (removing a half-written cache file)."""


_in_task = False


def _on_sigterm(*_: Any) -> None:
    if _in_task:
        raise _Terminated
    os._exit(143)


def _worker_task(path: str, entry: Path, config: CorrelateConfig, device: str) -> Any:
    """:func:`_measure_and_cache` in a worker, ended by SIGTERM without a traceback."""
    global _in_task
    _in_task = True
    try:
        return _measure_and_cache(path, entry, config, device)
    except _Terminated:
        os._exit(143)
    finally:
        _in_task = False


def _devices(device: str, jobs: int) -> list[str]:
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and jobs > 1:
        return [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    return [device]


def _measure_and_cache(
    path: str, entry: Path, config: CorrelateConfig, device: str
) -> dict[str, Any] | str:
    """Measure one checkpoint; a user-facing failure comes back as its one-line reason."""
    try:
        row = measure_one(path, config, device=device)
    except FlatcliError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the others
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    cached = {k: v for k, v in row.items() if k not in ("checkpoint", "path")}
    try:  # a link or FIFO planted at the entry's name is replaced, never written through
        text = json.dumps(_finite(cached))  # insertion order = column order
        atomic_write_text(entry, text, stream=False)
    except FlatcliError as e:  # a result that cannot be cached is still a result
        warn(f"the result of {Path(path).name} is not cached: {e}")
    return row


def _finite(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with non-finite numbers (a measure that failed) as None, as JSON has them."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
    }


def measure_one(
    path: str | Path, config: CorrelateConfig, *, device: str | None = None
) -> dict[str, Any]:
    """Measures on the train split, and loss/accuracy on train and test, of one checkpoint."""
    import torch

    from . import registry
    from .features import LayerSplit, default_layer
    from .measures.relative_flatness import evaluate
    from .prepare import prepare

    prep = prepare(
        path,
        arch=config.arch,
        arch_kwargs=config.arch_kwargs,
        trust_code=config.trust_code,
        data=config.data,
        split="train",
        target=config.target,
        max_samples=config.max_samples,
        batch_size=config.batch_size,
        device=device or config.device,
        dtype=config.dtype,
        loss=config.loss,
    )
    if not prep.has_split("test"):
        raise FlatcliError(
            f"{prep.data_spec} has no test split (x_test, y_test): the generalization gap needs one"
        )
    layer = config.layer or default_layer(prep.model)
    mconf = registry.MeasureConfig.of(config.options, layer=layer, loss=prep.loss)
    names = list(config.measures)
    inputs = registry.Inputs.of(prep.batches)
    results = registry.run_measures(prep.model, prep.batches, names, mconf, inputs=inputs)
    split = LayerSplit(prep.model, layer)
    with torch.no_grad():
        train = evaluate(split, prep.batches, prep.loss)
        test = evaluate(split, prep.split("test"), prep.loss)
    row: dict[str, Any] = {
        "checkpoint": Path(path).name,
        "path": str(path),
        "sha256": prep.checkpoint.sha256,
        "layer": layer,
        "n_train": train["n"],
        "n_test": test["n"],
        "train_loss": train["loss"],
        "test_loss": test["loss"],
        "train_acc": train["accuracy"],
        "test_acc": test["accuracy"],
    }
    for name, est in results.items():
        row[name] = est.value
        row[f"{name}_stderr"] = est.stderr
    row["hparams"] = prep.checkpoint.hparams
    return row


def results_table(run: CorrelateRun, *, hparams_csv: str | Path | None = None):  # noqa: ANN201
    """The per-checkpoint table (pandas), with gaps and hyperparameter columns ``hp_<name>``."""
    import pandas as pd

    from .stats import add_gaps

    records = []
    for row in run.rows:
        flat = {k: v for k, v in row.items() if k != "hparams"}
        flat.update({f"hp_{k}": v for k, v in (row.get("hparams") or {}).items()})
        records.append(flat)
    df = pd.DataFrame.from_records(records)
    if hparams_csv is not None:
        df = _merge_hparams(df, Path(hparams_csv))
    if df.empty:
        return df
    return add_gaps(df)


def _merge_hparams(df, path: Path):  # noqa: ANN001, ANN202 - pandas frames
    import pandas as pd

    if not path.is_file():
        raise FlatcliError(f"hyperparameter table not found: {path}")
    table = pd.read_csv(path)
    key = next((c for c in ("checkpoint", "file", "path") if c in table.columns), None)
    if key is None:
        raise FlatcliError(f"{path} needs a 'checkpoint' column with the checkpoint file names")
    table = table.assign(checkpoint=table[key].map(lambda s: Path(str(s)).name))
    table = table.drop(
        columns=[c for c in ("file", "path") if c in table.columns and c != key]
        + ([key] if key != "checkpoint" else [])
    )
    table = table.rename(columns={c: f"hp_{c}" for c in table.columns if c != "checkpoint"})
    overlap = [c for c in table.columns if c != "checkpoint" and c in df.columns]
    return df.drop(columns=overlap).merge(table, on="checkpoint", how="left")


DERIVED_HPARAMS = (
    "seed",
    "fam_lambda_used",
    "fam_step_ratio",
    "n_train",
    "diverged_in_epoch",
    "weights_of_epoch",
)
"""Keys of ``flatcli.hparams`` that Ψ does not group by: the seed (replicates), and what
``flatcli finetune`` records beside its settings but derives from them or measures (λ
used, the step ratio R, the training set's size, where a run diverged). Grouping by a
value that varies with a setting, or with every run, leaves no group in which that
setting alone varies."""


def hparam_columns(df) -> list[str]:  # noqa: ANN001
    """The hyperparameter columns (``hp_*``) that vary, :data:`DERIVED_HPARAMS` excluded."""
    derived = {f"hp_{k}" for k in DERIVED_HPARAMS}
    return [
        c
        for c in df.columns
        if c.startswith("hp_") and c not in derived and df[c].nunique(dropna=True) > 1
    ]


def measure_columns(df) -> list[str]:  # noqa: ANN001
    """The measure columns of a results table, in registry order."""
    from .registry import available

    return [m for m in available() if m in df.columns and m not in ("train_loss", "train_accuracy")]


def analyse(
    df,
    *,
    measures: Sequence[str],
    bootstrap: int,
    seed: int,
    granulate_by: Sequence[str] | None = None,
) -> dict[str, Any]:  # noqa: ANN001
    """Correlation table and granulated Kendall Ψ of every measure with both gaps, and what
    a reader must know first: ``warnings`` (too few checkpoints, constant gaps) and
    ``gap_notes``, why a gap's correlations are n/a, keyed by gap."""
    from .stats import GAPS, constant_gaps, correlation_table, granulated_kendall, small_n_warning

    if len(df) < 3:
        raise FlatcliError(f"correlations need at least 3 measured checkpoints, got {len(df)}")
    table = correlation_table(df, list(measures), list(GAPS), bootstrap=bootstrap, seed=seed)
    hps = list(granulate_by) if granulate_by is not None else hparam_columns(df)
    notes = constant_gaps(df, GAPS)
    granulated = {}
    if hps:  # a constant gap gets no Ψ: its τ-a of 0 in every group would read as a finding
        for gap in (g for g in GAPS if g not in notes):
            granulated[gap] = {m: granulated_kendall(df, m, gap, hps) for m in measures}
    n = int(table["n"].min()) if len(table) else len(df)  # a failed measure lowers its n
    warnings = [w for w in [small_n_warning(n), *notes.values()] if w]
    return {
        "correlations": table,
        "granulated": granulated,
        "hparams": hps,
        "warnings": warnings,
        "gap_notes": notes,
    }
