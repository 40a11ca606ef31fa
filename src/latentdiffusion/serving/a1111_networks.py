"""LoRAs of ``ldm serve --lora-dir`` as the web UI offers them: ``GET /sdapi/v1/loras`` and
``<lora:name:weight>`` tags in prompts, merged into the weights for that request only.

The folder, the tags, the ``Lora hashes`` and the merge are ``latentdiffusion.lora_tags``'s (shared with
the command line); here a bad tag becomes the request field's error. The merge runs on the queue's
worker: every layer a LoRA changes is copied first and copied back after the request (also when it fails
or is interrupted), so the model's weights afterwards are bit for bit what they were.

Also the web UI's other listings: the embeddings the model loaded, and those that are empty here, each
saying so by being empty: hypernetworks, face restorers, Real-ESRGAN models, prompt styles, and scripts
(none: the web UI's scripts are not run).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from latentdiffusion.lora_tags import LoraLibrary, LoraUse, TagError, lora_hashes, merged
from latentdiffusion.lora_tags import take_tags as take_prompt_tags
from latentdiffusion.serving.common import server_state
from latentdiffusion.serving.settings import FieldError

__all__ = ["LoraLibrary", "LoraUse", "lora_hashes", "merged", "router", "take_tags"]

router = APIRouter()


def take_tags(prompt: str, negative_prompt: str, library: LoraLibrary) -> tuple[str, list[LoraUse]]:
    """``lora_tags.take_tags``, a bad tag answered as its request field's error (HTTP 422)."""
    try:
        return take_prompt_tags(prompt, negative_prompt, library)
    except TagError as error:
        raise FieldError(error.field, error.reason) from None


# ---------------------------------------------------------------------------------------------- routes


def libraries(request: Request) -> Any:
    from latentdiffusion.serving.a1111_state import resources

    return resources(server_state(request))


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA files of ``--lora-dir``: ``name`` (for ``<lora:name:weight>``), ``alias``, ``path``,
    ``metadata`` (the safetensors header's)."""
    return [
        {"name": lora.name, "alias": lora.alias, "path": str(lora.path), "metadata": lora.metadata}
        for lora in libraries(request).loras.files()
    ]


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    """Read ``--lora-dir`` again."""
    libraries(request).loras.refresh()


@router.get("/embeddings")
async def embeddings(request: Request) -> dict[str, Any]:
    """The textual-inversion embeddings of ``--embeddings-dir`` the model loaded, as the web UI lists them
    (``step``, ``shape``: the first text encoder's width, ``vectors``); files that fit no text encoder
    are refused when the server starts, so none is skipped."""
    from latentdiffusion.embeddings import loaded_embeddings

    loaded = loaded_embeddings(server_state(request).pipe.components)
    return {
        "loaded": {
            e.name: {
                "step": e.step,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": next(iter(e.vectors.values())).shape[1],
                "vectors": e.length,
            }
            for e in loaded
        },
        "skipped": {},
    }


@router.get("/prompt-styles")
async def prompt_styles() -> list[dict[str, Any]]:
    """No prompt styles are defined (a request that names one is refused)."""
    return []


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """The web UI's scripts are not run here (``script_name`` is refused); ControlNet units are read
    from ``alwayson_scripts`` (docs/serving.md)."""
    return {"txt2img": [], "img2img": []}


@router.get("/hypernetworks")
async def hypernetworks() -> list[dict[str, Any]]:
    """Hypernetworks are not supported: none."""
    return []


@router.get("/face-restorers")
async def face_restorers() -> list[dict[str, Any]]:
    """No face restorers (``restore_faces`` is refused)."""
    return []


@router.get("/realesrgan-models")
async def realesrgan_models() -> list[dict[str, Any]]:
    """No Real-ESRGAN models: the upscalers are in ``GET /sdapi/v1/upscalers``."""
    return []
