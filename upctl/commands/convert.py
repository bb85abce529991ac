"""`upctl convert`: released Uni-Perceiver checkpoints -> a model directory."""

from __future__ import annotations

from pathlib import Path

import typer

from upctl.common import console, fail_on_error


def convert(
    source: Path = typer.Argument(..., help="Released checkpoint: a .pth file ({'model': ...} or a bare state dict) or a DeepSpeed folder."),
    out_dir: Path = typer.Argument(..., help="Model directory to write (config.json + model.safetensors)."),
    image_size: int = typer.Option(224, help="Image size the converted model will run at (sets the spatial table)."),
) -> None:
    """Convert an official Uni-Perceiver checkpoint (torch or DeepSpeed format, prompt-tuned extras included).

    Every source key is mapped or knowingly dropped; an unknown key or a wrong shape stops with its name.
    The file is read with torch.load(weights_only=True): a checkpoint can never run code.

    Examples:

      upctl convert uni-perceiver-base-L12-H768-224size-torch-pretrained.pth models/base

      upctl convert ds_ckpt/global_step45000 models/base-ds
    """
    from uniperceiver.modeling.convert import convert_checkpoint

    with fail_on_error():
        out, cfg, notes = convert_checkpoint(source, out_dir, image_size=image_size, log=None)
    console.print(
        f"converted [bold]{source}[/] -> [bold]{out}[/]: size {cfg.size} ({cfg.depth} x {cfg.width}), "
        f"{len(notes)} key(s) knowingly dropped"
    )
    for note in notes:
        console.print(f"  dropped: {note}", highlight=False)
