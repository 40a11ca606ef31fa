"""``ldm serve``: an HTTP server with OpenAI- and AUTOMATIC1111-compatible APIs and a web page
(docs/serving.md). FastAPI and uvicorn are an optional extra: ``pip install 'latentdiffusion[serve]'``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from latentdiffusion.cli.common import add_model_option, formatter, load_model, positive_int, writable_folder

# package -> the modules it may install (python-multipart: "python_multipart", formerly "multipart")
SERVE_PACKAGES = {
    "fastapi": ("fastapi",),
    "uvicorn": ("uvicorn",),
    "python-multipart": ("python_multipart", "multipart"),
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model over HTTP (OpenAI/A1111 APIs, web page)", formatter_class=formatter
    )
    add_model_option(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="TCP port")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on the API routes; unset: $LDM_API_KEY (which, unlike "
        "an argument, other users cannot read in the process list), else no key",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="also save every image here (PNG + info)"
    )
    parser.add_argument(
        "--queue-size", type=positive_int, default=8, help="requests that may wait (then 429)"
    )
    parser.add_argument("--max-size", type=positive_int, default=1024, help="largest image side, pixels")
    parser.add_argument("--max-steps", type=positive_int, default=150, help="most sampling steps per request")
    parser.add_argument("--max-images", type=positive_int, default=8, help="most images per request")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--controlnet-dir",
        type=Path,
        default=None,
        help="a folder of ControlNets (single files, or diffusers folders) offered by /controlnet/model_list "
        "and usable in requests (alwayson_scripts.controlnet)",
    )
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="a folder of LoRA files offered to ComfyUI workflows (LoraLoader; /object_info lists them) "
        "and to <lora:name:weight> prompt tags (/sdapi/v1/loras lists them)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a folder of models (checkpoint files, diffusers or saved folders) listed by "
        "/sdapi/v1/sd-models and switched by POST /sdapi/v1/options; one is in memory at a time, --model "
        "(a path, or a name in this folder) first",
    )
    parser.add_argument(
        "--motion-dir",
        type=Path,
        default=None,
        help="a folder of AnimateDiff motion modules (files, or MotionAdapter folders) offered by "
        "GET /v1/motion-modules and usable in POST /v1/videos/generations",
    )
    parser.set_defaults(run=run)


def require_serve_extra() -> None:
    from latentdiffusion.errors import UserError

    missing = [
        package
        for package, modules in SERVE_PACKAGES.items()
        if not any(importlib.util.find_spec(module) for module in modules)
    ]
    if missing:
        raise UserError(f"the server needs {', '.join(missing)}: pip install 'latentdiffusion[serve]'")


def resolve_model_dir(args: argparse.Namespace) -> None:
    """Check ``--model-dir``; a ``--model`` that is no path but a name in that folder means that model."""
    from latentdiffusion.errors import UserError

    if not args.model_dir.is_dir():
        raise UserError(f"--model-dir {args.model_dir} is not a folder")
    inside = args.model_dir / str(args.model)
    if not Path(str(args.model)).exists() and inside.exists():
        args.model = str(inside)


def run(args: argparse.Namespace) -> int:
    require_serve_extra()
    if args.output_dir is not None:
        writable_folder(args.output_dir, f"--output-dir {args.output_dir}")
    if args.controlnet_dir is not None and not args.controlnet_dir.is_dir():
        from latentdiffusion.errors import UserError

        raise UserError(f"--controlnet-dir {args.controlnet_dir} is not a folder")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        from latentdiffusion.errors import UserError

        raise UserError(f"--lora-dir {args.lora_dir} is not a folder")
    if args.motion_dir is not None and not args.motion_dir.is_dir():
        from latentdiffusion.errors import UserError

        raise UserError(f"--motion-dir {args.motion_dir} is not a folder")
    if args.model_dir is not None:
        resolve_model_dir(args)
    import uvicorn

    from latentdiffusion.serving.app import create_app, server_config
    from latentdiffusion.serving.settings import Limits, ServerSettings, is_loopback

    limits = Limits(
        max_side=args.max_size,
        max_steps=args.max_steps,
        max_images=args.max_images,
        queue_size=args.queue_size,
    )
    api_key = args.api_key or os.environ.get("LDM_API_KEY") or None
    settings = ServerSettings(
        limits,
        api_key,
        args.output_dir,
        str(args.model),
        controlnet_dir=args.controlnet_dir,
        lora_dir=args.lora_dir,
        model_dir=args.model_dir,
        motion_dir=args.motion_dir,
        loader=lambda source: load_model(args, source),
    )
    if not is_loopback(args.host) and settings.api_key is None:
        print(
            f"ldm serve: warning: listening on {args.host} without --api-key: anyone who can reach "
            "this machine can use the server",
            file=sys.stderr,
        )
    pipe = load_model(args)
    server = uvicorn.Server(server_config(create_app(pipe, settings), args.host, args.port))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after a clean shutdown
        server.run()
    return 0
