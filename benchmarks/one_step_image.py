"""Where the one-step 512x512 image's time goes (``benchmarks/cpu.py``'s "one-step 512x512 image" row).

    OMP_NUM_THREADS=1 python benchmarks/one_step_image.py [--precision auto] [--repeats 3] [--threads 1]
                                                         [--clock cpu|wall]

The SD 2.1 architecture with random weights (``preset:sd21``, default initialisation) and a random tiny
decoder (TAESD's shapes, ``benchmarks/cpu_models.py``), loaded as ``ld.load(..., precision, tiny_vae)``
does it. Process CPU seconds (``time.process_time``; other processes on the machine do not count) of:
one text-encoder pass (one prompt), one U-Net call (batch 1, 64x64 latent, no guidance), the tiny decoder
at 512 px with its convolutions on packed oneDNN weights and plain, and the whole 1-step image
(``pipe.generate(steps=1, guidance_scale=1)``), the U-Net call and the image also with token merging
(``--token-merging``, default 0.5), whose image's PSNR against the plain one is printed last. Each
row: the median of ``--repeats`` after one warm-up call (which packs the weights for its input shape).
``--clock wall`` times wall-clock seconds instead (what a user waits with ``--threads 2`` on a quiet
machine; process CPU seconds add up the threads).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from cpu import cpu_flags, image_psnr  # this folder is on sys.path (above)
from cpu_worker import median_seconds

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 512


def one_step_image(pipe, latents: torch.Tensor, token_merging: float | None = None):
    return pipe.generate(
        PROMPT,
        width=SIZE,
        height=SIZE,
        steps=1,
        guidance_scale=1.0,
        latents=latents,
        seed=1,
        token_merging=token_merging,
    )[0]


def probes(pipe, ratio: float) -> dict[str, object]:
    """The parts of a one-step image as calls on ``pipe``'s components (name -> function)."""
    from latentdiffusion.models.layers import is_prepacked, set_prepacking
    from latentdiffusion.pipelines.token_merging import with_token_merging
    from latentdiffusion.prompts import encode_prompts

    components = pipe.components
    tokenizer, encoder = components.tokenizers["text_encoder"], components.modules["text_encoder"]
    dtype, f = components.dtype, SIZE // 8
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, f, f, generator=generator)
    context = encode_prompts(tokenizer, encoder, [PROMPT], 1).to(dtype)
    decoder = components.autoencoder

    def decode(packed: bool):
        def run():
            as_loaded = is_prepacked(decoder)
            set_prepacking(decoder, packed)
            try:
                return decoder.from_latent(latents.to(dtype))
            finally:
                set_prepacking(decoder, as_loaded)

        return run

    merged = with_token_merging(components, ratio).unet
    t = torch.tensor([999.0])
    return {
        "text encoder (1 prompt)": lambda: encode_prompts(tokenizer, encoder, [PROMPT], 1),
        "U-Net call (batch 1)": lambda: components.unet(latents.to(dtype), t, context),
        f"U-Net call, token merging {ratio}": lambda: merged(latents.to(dtype), t, context),
        "tiny decoder 512 px, packed": decode(True),
        "tiny decoder 512 px, plain": decode(False),
        "one-step image": lambda: one_step_image(pipe, latents),
        f"one-step image, token merging {ratio}": lambda: one_step_image(pipe, latents, ratio),
    }


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW", help="rows whose name starts so")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--token-merging", type=float, default=0.5, help="the ratio of the merged rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import latentdiffusion as ld
    from cpu_models import write_taesd
    from latentdiffusion.pipelines.precision import precision_of

    with tempfile.TemporaryDirectory() as folder:
        pipe = ld.load("preset:sd21", precision=args.precision, tiny_vae=write_taesd(Path(folder)))
    print(
        f"sd21 architecture, random weights, tiny decoder; precision {precision_of(pipe.components)}; ",
        end="",
    )
    clock, unit = (time.process_time, "CPU s") if args.clock == "cpu" else (time.perf_counter, "wall s")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU flags: {cpu_flags()}; {unit}\n"
    )
    rows = {
        name: median_seconds(run, args.repeats, clock)[1]  # after one untimed call
        for name, run in probes(pipe, args.token_merging).items()
        if args.only is None or any(name.startswith(prefix) for prefix in args.only)
    }
    print(f"| part | {unit} (median of {args.repeats}) |")
    print("|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} |")
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    plain, merged = one_step_image(pipe, latents), one_step_image(pipe, latents, args.token_merging)
    ratio = args.token_merging
    print(f"\ntoken merging {ratio} against none, one-step image: {image_psnr(merged, plain):.1f} dB PSNR")


if __name__ == "__main__":
    main()
