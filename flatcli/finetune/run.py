r"""The orchestrator of a fine-tuning run, :func:`finetune`: each step minimizes the
mini-batch loss plus λ times the relative flatness κ of one layer on the same mini-batch.

Each job is a module of :mod:`flatcli.finetune`, called here in order: the options
(:mod:`~flatcli.finetune.config`), the data (:func:`flatcli.prepare.training_data`), the
run's pieces (:mod:`~flatcli.finetune.setup`), the resumable state
(:mod:`~flatcli.finetune.state`), λ (:mod:`~flatcli.finetune.fam_lambda`), the guard
(:mod:`flatcli.guard`), the epoch loop (:mod:`~flatcli.finetune.loop`), the temperature
baseline (:mod:`~flatcli.finetune.temperature`), the files
(:mod:`~flatcli.finetune.outputs`) and the result (:mod:`~flatcli.finetune.result`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import Checkpoint, check_finite, load_checkpoint
from ..fam import FAMRegularizer
from ..finetune_report import EpochRecord
from ..guard import DivergenceGuard, chance_level, snapshot
from ..losses import check_loss
from ..measures.estimate import Estimate
from ..prepare import DataLike, training_data
from ..runtime import manifest, resolve_device, resolve_dtype
from .config import FinetuneConfig
from .fam_lambda import announce_lambda, penalty_share, resolve_lambda
from .loop import train_epochs
from .outputs import check_not_inputs, check_outputs, measured_dict, write_outputs
from .result import FinetuneResult
from .setup import Training, setup_training
from .state import check_resumable, check_state, default_state_path, load_state, restore
from .temperature import temperature_baseline


def finetune(
    model: str | Path | Checkpoint | nn.Module,
    data: DataLike | None = None,
    config: FinetuneConfig | None = None,
    *,
    test_data: DataLike | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> FinetuneResult:
    r"""Fine-tune with FAM: minimize :math:`E_{\text{batch}} + \lambda\,\kappa(W^l)` (FAM Eq. 1).

    κ comes from :class:`~flatcli.fam.FAMRegularizer`, which gives the exact gradient of
    FAM's Lemma 1 (or, with ``fam_gradient="detached"``, the published code's term (I)
    only). The step runs one forward pass, and the penalty reuses it. The relative step R
    at step 0 (:mod:`flatcli.finetune.fam_lambda`) is recorded as
    ``hparams["fam_step_ratio"]``, with a warning above ``WARN_STEP_RATIO``.

    Args:
        model: A checkpoint path, a loaded :class:`~flatcli.checkpoints.Checkpoint`, or a
            module. A copy is trained; the argument is left untouched.
        data: Training data: a bundled name or file (its ``test`` split, when present,
            is used for evaluation), a :class:`~flatcli.data.Dataset`, or an ``(x, y)``
            pair. Default: the checkpoint's ``data`` metadata.
        config: The options (:class:`FinetuneConfig`, which documents each one).
        test_data: Evaluation data, if it is not the ``test`` split of ``data``.
        progress: Called with one line of text per stage and per epoch.
        **options: Options by name, instead of or on top of ``config``
            (``fam_lambda=0.1, epochs=2``).

    Returns:
        A :class:`FinetuneResult`; the files it names are written.

    Raises:
        ConfigError: A bad option (a :class:`~flatcli.errors.UsageError` naming it).
        UsageError: An unknown layer, or an output that is an input or another output.
        Diverged: The guard (:class:`~flatcli.guard.DivergenceGuard`) fired. The last good
            epoch's weights are in ``out_path``, and the log and plot show that epoch.
        FlatcliError: Unreadable data or checkpoint, or a state file from another run.
    """
    cfg = replace(config or FinetuneConfig(), **options) if options else config
    cfg = cfg or FinetuneConfig()
    note = progress or (lambda _msg: None)
    dev = cfg.device if isinstance(cfg.device, torch.device) else resolve_device(cfg.device)
    dt = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else resolve_dtype(cfg.dtype)
    ck = _as_checkpoint(model)
    out, state_file = _check_files(cfg, ck, data, test_data)
    net = copy.deepcopy(ck.model).to(device=dev, dtype=dt)
    check_finite(net)
    loss = check_loss(cfg.loss or ck.metadata.get("loss") or "cross_entropy")
    spec, train, test = training_data(
        ck, net, data, test_data, target=cfg.target, max_samples=cfg.max_samples
    )
    tr = setup_training(
        cfg, ck, net, train, test, loss=loss, data_spec=spec, device=dev, dtype=dt,
        out=out, state_file=state_file,
    )  # fmt: skip
    start_net = copy.deepcopy(net)  # the starting weights, for the temperature baseline
    start_snapshot = snapshot(tr.reg, tr.x, tr.y)  # for the guard; eval mode, no randomness
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.default_generator.manual_seed(tr.torch_seed)
        if dev.type == "cuda":
            torch.cuda.manual_seed(tr.torch_seed)
        history, before, resumed = _begin(tr, note)
        lam = float(tr.hparams["fam_lambda_used"])
        warnings = announce_lambda(tr.hparams, note) + penalty_share(lam, before, cfg.kappa_key)
        guard = DivergenceGuard(
            start=start_snapshot,
            chance=chance_level(tr.y, loss, tr.classes),
            kappa0=before[cfg.kappa_key].value,
            weight0=before["weight_norm"].value,
            fam=lam > 0,
            kappa_exact=not tr.reg.describe().startswith("hutchinson"),
        )
        train_epochs(tr, guard, history, before, note)
    net.eval()
    note("measuring the fine-tuned model")
    after = tr.measures()
    matched, c, why = temperature_baseline(start_net, tr.x, tr.y, after, loss, tr.measures)
    out_sha = write_outputs(
        net, ck, hparams=tr.hparams, history=history,
        measured=measured_dict(before, after, matched, c), before=before,
        paths=(out, cfg.log_path, cfg.plot_path), kappa_key=cfg.kappa_key,
        data_spec=spec, device=dev, dtype=dt,
    )  # fmt: skip
    return FinetuneResult(
        model=net,
        history=tuple(history),
        before=before,
        after=after,
        layer=tr.layer,
        fam_method=tr.reg.describe(),
        hparams=tr.hparams,
        resumed_from=resumed,
        out_path=out,
        out_sha256=out_sha,
        log_path=Path(cfg.log_path) if cfg.log_path is not None else None,
        plot_path=Path(cfg.plot_path) if cfg.plot_path is not None else None,
        state_path=state_file,
        parent_sha256=ck.sha256,
        temperature_matched=matched,
        temperature_c=c,
        temperature_note=why,
        warnings=tuple(warnings),
        manifest=manifest(device=dev, dtype=dt, seed=cfg.seed),
    )


def _begin(
    tr: Training, note: Callable[[str], None]
) -> tuple[list[EpochRecord], dict[str, Estimate], int]:
    """Restore the state file (with ``resume``), else measure the starting model and
    choose λ: the history so far, the starting measures, and the epochs restored."""
    cfg = tr.config
    state = load_state(tr.state_file, tr.device) if cfg.resume and tr.state_file else None
    if state is not None:
        check_state(state, tr.state_file, cfg.schedule)  # type: ignore[arg-type]
        check_resumable(state, tr.hparams, tr.checkpoint.sha256, cfg.epochs, tr.data_sha256)
        got = restore(state, tr)
        tr.hparams["fam_lambda_used"] = got.fam_lambda_used
        tr.hparams["fam_step_ratio"] = got.fam_step_ratio
        note(f"resuming after epoch {got.epoch} of {cfg.epochs} from {tr.state_file}")
        return list(got.history), dict(got.before), got.epoch
    if cfg.resume:
        note(f"no state file at {tr.state_file}; starting from epoch 0")
    note("measuring the starting model")
    before = tr.measures()
    step0 = FAMRegularizer(tr.net, tr.layer, seed=cfg.seed, **tr.fam_options)
    tr.hparams.update(
        resolve_lambda(
            cfg.fam_lambda,
            cfg.fam_scale,
            before=before,
            kappa_key=cfg.kappa_key,
            reg=step0,
            x=tr.x,
            y=tr.y,
            lr=cfg.lr,
            beta=cfg.beta,
        )  # fmt: skip
    )
    return [], before, 0


def _check_files(
    cfg: FinetuneConfig, ck: Checkpoint, data: Any, test_data: Any
) -> tuple[Path | None, Path | None]:
    """Check every output before any training; the output checkpoint and the state file."""
    from ..hf import is_pretrained_model

    check_outputs(
        cfg.out_path, cfg.log_path, cfg.plot_path, cfg.state_path,
        folder=is_pretrained_model(ck.model),
    )  # fmt: skip
    outputs = (cfg.out_path, cfg.log_path, cfg.plot_path, cfg.state_path)
    check_not_inputs(ck, [data, test_data], outputs, overwrite_input=cfg.overwrite_input)
    out = Path(cfg.out_path) if cfg.out_path is not None else None
    state_file = Path(cfg.state_path) if cfg.state_path is not None else default_state_path(out)
    return out, state_file


def _as_checkpoint(model: str | Path | Checkpoint | nn.Module) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    if isinstance(model, nn.Module):
        return Checkpoint(model=model, path=Path("<memory>"), sha256="", format="module")
    return load_checkpoint(model)
