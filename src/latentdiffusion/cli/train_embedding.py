"""``ldm train-embedding``: learn a textual-inversion word for a model that ``ld.load`` reads.

    ldm train-embedding --model MODEL --images DIR --token WORD --init-word WORD [--vectors N]
                        [-o DIR] [--resume] [--KEY=VALUE ...]

The model stays frozen; only the word's N vectors learn (``training.embedding``). Images take captions
from same-stem ``.txt`` files (``{token}`` stands for the word) or from photo templates. The run exports
``DIR/export/WORD.safetensors`` in the AUTOMATIC1111 format, for ``pipe.load_embedding`` and
``--embeddings-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiffusion.cli.common import formatter, positive_int
from latentdiffusion.cli.finetune import add_run_options, frozen_model_run
from latentdiffusion.cli.train import overrides

DESCRIPTION = (
    "Learn a new prompt word (textual inversion) for a model (the shipped 'default', a .safetensors/.ckpt "
    "file, a diffusers folder or a model folder), the model itself frozen: --token names the word, its "
    "--vectors N vectors start from the token embedding of --init-word. Captions come from same-stem .txt "
    "files beside the images ({token} stands for the word) or from 'a photo of a {token}' templates. Set "
    "any training option with --KEY=VALUE as for `ldm train` (--max_steps=1000 --optim.lr=5e-3); "
    "--show-config prints them all. The export is DIR/export/WORD.safetensors (AUTOMATIC1111 format): "
    "ldm generate 'a WORD circle' --embeddings-dir DIR/export"
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train-embedding",
        help="learn a textual-inversion word from a few images",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    parser.add_argument("--model", default=None, help="the model (required unless --resume finds it)")
    parser.add_argument("--images", type=Path, default=None, help="folder of training images")
    parser.add_argument("--token", default=None, help="the new word, e.g. my-style")
    parser.add_argument("--init-word", default=None, help="the word whose embedding the vectors start from")
    parser.add_argument("--vectors", type=positive_int, default=None, help="vectors per token (default 1)")
    add_run_options(parser)
    parser.set_defaults(run=run)


def resolve_options(args: argparse.Namespace, saved):
    """The word options from the flags; on --resume, the run's saved ones where no flag is given."""
    from latentdiffusion.errors import UserError
    from latentdiffusion.training.embedding import EmbeddingOptions

    token = args.token or (saved and saved.token)
    init_word = args.init_word or (saved and saved.init_word)
    if not token or not init_word:
        raise UserError("pass --token WORD (the new word) and --init-word WORD (where its vectors start)")
    vectors = args.vectors or (saved.vectors if saved else 1)
    return EmbeddingOptions(token, init_word, vectors)


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.errors import UserError
    from latentdiffusion.training.embedding import embedding_config, saved_options, train_embedding

    saved = saved_options(args.output) if args.resume and args.output is not None else None
    options = resolve_options(args, saved)
    options.validate()

    def new_config(model: str, model_config):
        if args.images is None:
            raise UserError("pass --images DIR: the folder of training images")
        return embedding_config(model, model_config, args.images, overrides(args))

    planned = frozen_model_run(args, "the model the word is learned for", new_config)
    if planned is None:
        return 0
    config, run_dir = planned
    result = train_embedding(config, run_dir, options, resume=args.resume, verbose=not args.quiet)
    if result.export_dir is not None:
        print(
            f"step {result.step}: embedding saved to {result.export_dir / (options.token + '.safetensors')}"
        )
    return 0
