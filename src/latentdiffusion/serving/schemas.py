"""Request bodies as pydantic models: the AUTOMATIC1111 web UI's ``/sdapi/v1`` fields and OpenAI's
image-generation fields, with the types and static ranges of each; limits that the server's settings
choose (largest size, steps, images) are checked per request (``settings``).

Fields other than these are accepted and ignored (docs/serving.md lists what is honoured), so that
clients written for those services work unchanged. The web UI's routes also take SDXL's
micro-conditioning under diffusers' names (``MicroConditioningFields``); the OpenAI routes refuse it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from latentdiffusion.families import MicroConditioning
from latentdiffusion.serving.settings import MAX_SEED

Seed = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
# Checked by ``MicroConditioning.validate`` (one message per bad field), so typed loosely here.
PAIR = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
Pair = Annotated[Any, WithJsonSchema({"anyOf": [PAIR, {"type": "null"}]})]
Score = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "null"}]})]
MICRO_FIELDS = tuple(f.name for f in fields(MicroConditioning))
MICRO_DEFAULTS = MicroConditioning()


def first_invalid_text(data: Any) -> str | None:
    """The path (``a.b[2]``) of the first string in ``data`` (keys included) that is not valid Unicode,
    i.e. holds a lone surrogate (JSON's ``"\\ud800"`` escape), or None. Such text would fail later, in
    the tokenizer, the PNG info or the JSON answer, as an internal error."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _encodable(value):
            return path or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not _encodable(key):
                    return (path or "body") + " (a key)"
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ValidText(BaseModel):
    """Refuses (HTTP 422) a request whose text anywhere is not valid Unicode, naming where."""

    @model_validator(mode="before")
    @classmethod
    def refuse_invalid_text(cls, data: Any) -> Any:
        where = first_invalid_text(data)
        if where is not None:
            raise PydanticCustomError(
                "unicode",
                "{field} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text",
                {"field": where.encode("ascii", "backslashreplace").decode("ascii")},
            )
        return data


class MicroConditioningFields(ValidText):
    """SDXL's size and crop conditioning and the refiner's aesthetic scores (Podell et al. 2023,
    Sec. 2.2 and 2.5), with diffusers' names, as extension fields of the web UI's payloads. Sizes are
    [height, width] and crops [top, left] in pixels; unset, sizes are the output's and the negative
    values the positive ones. Models without this conditioning (SD 1.x/2.x) ignore it."""

    original_size: Pair = Field(None, description="[height, width]; unset: the output size")
    crops_coords_top_left: Pair = Field(None, description="[top, left]; unset: [0, 0]")
    target_size: Pair = Field(None, description="[height, width] (SDXL base); unset: the output size")
    negative_original_size: Pair = Field(None, description="unset: original_size")
    negative_crops_coords_top_left: Pair = Field(None, description="unset: crops_coords_top_left")
    negative_target_size: Pair = Field(None, description="unset: target_size")
    aesthetic_score: Score = Field(None, description="SDXL refiner; unset: 6")
    negative_aesthetic_score: Score = Field(None, description="SDXL refiner; unset: 2.5")

    def micro_conditioning(self) -> MicroConditioning | None:
        """The given fields as ``MicroConditioning`` (None when none is given); a bad value raises
        ``UserError`` naming its field (HTTP 422)."""
        given = {name: getattr(self, name) for name in MICRO_FIELDS if getattr(self, name) is not None}
        if not given:
            return None
        MicroConditioning(**given).validate()  # before conversion, so messages show what was sent
        pairs = {name: tuple(value) for name, value in given.items() if isinstance(value, list)}
        return MicroConditioning(**{**given, **pairs})


def changed_micro_conditioning(micro: MicroConditioning | None) -> dict[str, Any]:
    """The fields of ``micro`` that differ from the defaults, as JSON values (pairs as lists)."""
    if micro is None:
        return {}
    changed = {}
    for name in MICRO_FIELDS:
        value = getattr(micro, name)
        if value != getattr(MICRO_DEFAULTS, name):
            changed[name] = list(value) if isinstance(value, tuple) else value
    return changed


class ControlNetUnitRequest(ValidText):
    """One unit of ``alwayson_scripts.controlnet.args`` (AUTOMATIC1111's ControlNet extension's
    ``ControlNetUnit`` API fields, honoured part; docs/serving.md). Unlike the extension, ``enabled``
    defaults to true: a unit that is sent is used unless it says ``enabled: false``."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def legacy_names(cls, data: Any) -> Any:
        """The extension's older field names: input_image, mask_image, guidance (= guidance_end)."""
        aliases = {"input_image": "image", "mask_image": "mask", "guidance": "guidance_end"}
        if isinstance(data, dict):
            for old, new in aliases.items():
                if old in data and new not in data:
                    data = {**data, new: data[old]}
        return data

    enabled: bool = True
    module: str = Field("none", description="preprocessor: GET /controlnet/module_list")
    model: str = Field("None", description="GET /controlnet/model_list: 'name [hash]' or the name")
    weight: FiniteFloat = Field(1.0, ge=0, le=2)
    image: str | dict[str, str | None] | None = Field(
        None, description="base64; or {'image': ..., 'mask': ...}; unset in img2img: the init image"
    )
    mask: str | None = Field(None, description="base64, white where repainted (inpaint modules)")
    resize_mode: str | int = Field(
        "Crop and Resize", description="Just Resize, Crop and Resize, Resize and Fill"
    )
    control_mode: str | int = Field(
        "Balanced", description="Balanced, My prompt is more important, ControlNet is more important"
    )
    guidance_start: FiniteFloat = Field(0.0, ge=0, le=1)
    guidance_end: FiniteFloat = Field(1.0, ge=0, le=1)
    pixel_perfect: bool = False
    processor_res: int = Field(-1, description="the preprocessor's resolution; <= 0: the image's own")
    threshold_a: FiniteFloat = Field(-1, description="the preprocessor's first parameter; < 0: default")
    threshold_b: FiniteFloat = Field(-1, description="the preprocessor's second parameter; < 0: default")


class ControlNetScript(ValidText):
    model_config = ConfigDict(extra="allow")

    args: list[ControlNetUnitRequest] = Field(default_factory=list)


class AlwaysOnScripts(BaseModel):
    """``alwayson_scripts``: the ControlNet extension's entry is read (its name in any case); other
    scripts' entries are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def find_controlnet(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {("controlnet" if str(key).lower() == "controlnet" else key): v for key, v in data.items()}
        return data

    controlnet: ControlNetScript | None = None


class DetectRequest(ValidText):
    """``POST /controlnet/detect``: images through a preprocessor (the extension's field names)."""

    model_config = ConfigDict(extra="allow")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_processor_res: int = Field(-1, description="<= 0: each image's own size")
    controlnet_threshold_a: FiniteFloat = -1
    controlnet_threshold_b: FiniteFloat = -1
    controlnet_masks: list[str] = Field(default_factory=list, description="base64, one per image (inpaint)")


class Txt2ImgRequest(MicroConditioningFields):
    """``POST /sdapi/v1/txt2img`` (the web UI's StableDiffusionTxt2ImgProcessingAPI, honoured part)."""

    model_config = ConfigDict(extra="allow")  # echoed back in ``parameters``, otherwise unused

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Seed
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M Karras', 'dpmpp_2m'")
    sampler_index: str | None = Field(None, description="older name of sampler_name")
    scheduler: str | None = Field(None, description="automatic, karras or exponential")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="unset: the model's default")
    cfg_scale: FiniteFloat | None = Field(None, description="unset: the model's default")
    width: int | None = Field(None, ge=1, description="unset: the model's sample size")
    height: int | None = Field(None, ge=1, description="unset: the model's sample size")
    eta: FiniteFloat | None = Field(None, ge=0, description="DDIM only")
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = Field(None, max_length=100, description="id for /sdapi/v1/progress?id_task=")
    alwayson_scripts: AlwaysOnScripts = Field(default_factory=AlwaysOnScripts)


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: SDEdit, or inpainting when ``mask`` is given (white = repaint)."""

    init_images: list[str] = Field(min_length=1, description="base64 images; the first is used")
    mask: str | None = Field(None, description="base64 image, white where the image is repainted")
    denoising_strength: FiniteFloat = Field(0.75, ge=0, le=1)
    mask_blur: FiniteFloat = Field(4, ge=0)
    # the web UI's defaults: fill, and "only masked" with no padding
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill (as 1), 1 original, 2 noise, 3 nothing")
    inpaint_full_res: bool = Field(True, description="work on the masked area only, at full resolution")
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class ImageGenerationRequest(ValidText):
    """``POST /v1/images/generations`` (OpenAI), plus optional fields of ours."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def refuse_micro_conditioning(cls, data: Any) -> Any:
        """OpenAI's API describes an image by its size alone; rather than ignore micro-conditioning
        sent here (a silently different image), say where it is accepted."""
        sent = [name for name in MICRO_FIELDS if isinstance(data, dict) and name in data]
        if sent:
            raise PydanticCustomError(
                "micro_conditioning",
                "{fields}: SDXL micro-conditioning is accepted by /sdapi/v1/txt2img and /sdapi/v1/img2img, "
                "not by the OpenAI routes",
                {"fields": ", ".join(sent)},
            )
        return data

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT or 'auto' (the model's sample size)")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="url: a data: URL")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    # ours (the OpenAI client sends them with extra_body=...)
    negative_prompt: str | None = None
    seed: int = Seed
    steps: int | None = Field(None, ge=1)
    guidance_scale: FiniteFloat | None = None
    sampler: str | None = None


def echo(request: BaseModel, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request as the web UI's ``parameters`` field returns it."""
    data = request.model_dump()
    for name in drop:
        data[name] = None
    return data
