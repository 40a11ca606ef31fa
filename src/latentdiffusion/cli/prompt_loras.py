"""``--lora-dir DIR`` and ``<lora:NAME:WEIGHT>`` tags in the prompt of ``ldm generate``, ``img2img``,
``inpaint``, ``outpaint`` and ``upscale``, as the web UI reads them (``latentdiffusion.lora_tags``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_lora_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of LoRA / LyCORIS files (subfolders too) that <lora:NAME:WEIGHT> tags in the prompt "
        "name, as in the web UI: NAME is a file's name without extension; the PNG info records the tags "
        "and their Lora hashes",
    )


def take_prompt_loras(args: argparse.Namespace) -> tuple[str, Any]:
    """The prompt without its tags, and the (checked) tags' LoRAs, before any model is loaded."""
    from latentdiffusion.errors import UserError
    from latentdiffusion.lora_tags import LoraLibrary, take_tags

    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UserError(f"--lora-dir {args.lora_dir} is not a folder")
    library = LoraLibrary(args.lora_dir)
    prompt, uses = take_tags(args.prompt, args.negative, library)
    return prompt, (library, uses)


def with_prompt_loras(pipe: Any, tags: Any, sent: str, prompt: str, make: Callable[[], list]) -> list:
    """``make()``'s images with the tags' LoRAs merged into ``pipe`` (the weights come back afterwards),
    their PNG info giving the prompt as ``sent`` (tags included) and the ``Lora hashes``."""
    from latentdiffusion.lora_tags import merged, record_tags

    library, uses = tags
    with merged(pipe, uses):
        images = make()
    record_tags(images, sent, prompt, library, uses)
    return images
