"""``flatcli inspect``."""

from __future__ import annotations

import sys

from .app import app
from .common import check_format, friendly
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    Checkpoint,
    FormatOpt,
    TrustOpt,
)


@app.command()
@friendly
def inspect(
    checkpoint: Checkpoint,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_code: TrustOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """Layers, shapes and parameter counts, and which measures apply to each layer.

    Examples:

        flatcli inspect sample_models/digits_mlp.safetensors

        flatcli inspect model.pt --arch mypkg.nets:make_net --arch-kwargs '{"width": 64}'
    """
    from ..checkpoints import load_checkpoint
    from ..inspection import describe
    from ..prepare import parse_json_object
    from ..report import to_json

    fmt = check_format(fmt)
    ck = load_checkpoint(
        checkpoint,
        arch=arch,
        trust_code=trust_code,
        arch_kwargs=parse_json_object(arch_kwargs, "--arch-kwargs"),
    )
    info = describe(ck)
    if fmt == "json":
        sys.stdout.write(to_json(info))
        return
    if fmt == "csv":
        import pandas as pd

        sys.stdout.write(pd.DataFrame(info["layers"]).to_csv(index=False))
        return
    from .render import inspect_table

    inspect_table(ck, info)
