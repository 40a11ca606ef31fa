"""The default model and its few-step student side by side: prompt adherence by the strict checker and
images per second, in one run.

    python benchmarks/few_step_default.py --lora src/latentdiffusion/data/default/few-step-lora.safetensors \
        [--model default] [--n 100] [--threads 1] [--repeats 3] [--batch 16] [--precision auto]

Rows: the teacher as it ships (20 steps of DPM++ 2M, guided at its default scale), the teacher with the
LCM sampler at 4 steps (guided; no distillation), and the student (the teacher with its distilled LoRA merged)
at 4, 2 and 1 LCM steps, unguided. Adherence: ``evaluation.shapes_eval`` on the same ``--n`` prompts
and seeds per caption form for every row ("all" = every stated attribute right; "shape" over all
objects). Speed: wall-clock seconds of one batch of ``--batch`` 64x64 images (text encoding, sampling,
full decoder), median of ``--repeats`` after one warm-up batch, on ``--threads`` threads (the CPU flags
and thread count are printed). Quote it from a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from cpu import cpu_flags  # this folder is on sys.path (above)
from cpu_worker import median_seconds


def rows(teacher, student, guidance: float) -> list[tuple[str, object, dict]]:
    """(name, pipeline, generation settings) per configuration."""
    return [
        ("teacher, 20 steps DPM++ 2M, guided", teacher, {"steps": 20, "guidance_scale": guidance}),
        ("teacher, 4 steps LCM, guided", teacher, {"steps": 4, "sampler": "lcm", "guidance_scale": guidance}),
        *[
            (
                f"student, {steps} step{'s' * (steps > 1)} LCM, unguided",
                student,
                {"steps": steps, "sampler": "lcm", "guidance_scale": 1.0},
            )
            for steps in (4, 2, 1)
        ],
    ]


def adherence(pipe, prompts: dict[str, list[str]], settings: dict) -> dict[str, float]:
    from latentdiffusion.evaluation.shapes_eval import evaluate

    settings = dict(settings)
    guidance = settings.pop("guidance_scale")
    scores = {}
    for form, texts in prompts.items():
        result = evaluate(pipe, texts, form=form, guidance_scale=guidance, **settings)
        scores[f"{form} all"], scores[f"{form} shape"] = result.scores["all"], result.scores["shape"]
    return scores


def images_per_second(pipe, settings: dict, batch: int, repeats: int) -> float:
    prompts = ["a red circle in the top left on a blue background"] * batch
    seconds = median_seconds(lambda: pipe.generate(prompts, seed=1, **settings), repeats, time.perf_counter)[
        1
    ]
    return batch / seconds


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lora", required=True, help="the student's LoRA file (ldm finetune --lcm --lora)")
    parser.add_argument("--n", type=int, default=100, help="prompts per caption form")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="auto", help="as ldm generate's (auto: bf16 where native)")
    parser.add_argument("--no-adherence", action="store_true", help="speed only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import latentdiffusion as ld
    from latentdiffusion.evaluation.shapes_eval import eval_prompts
    from latentdiffusion.pipelines.precision import precision_of

    teacher = ld.load(args.model, precision=args.precision)
    student = ld.load(args.model, loras=[(args.lora, 1.0)], precision=args.precision)
    guidance = teacher.components.config.default_guidance_scale
    prompts = eval_prompts(args.n, 0)
    print(f"model {args.model}, student {args.lora}, {precision_of(teacher.components)}; ", end="")
    print(f"CPU flags: {cpu_flags()}; ", end="")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    columns = ["single all", "single shape", "relational all", "relational shape"]
    print(
        f"| configuration | {' | '.join(columns)} | images/s (batch {args.batch}, median of {args.repeats}) |"
    )
    print("|---" * (len(columns) + 2) + "|")
    for name, pipe, settings in rows(teacher, student, guidance):
        scores = {} if args.no_adherence else adherence(pipe, prompts, settings)
        cells = [f"{100 * scores[c]:.0f}%" if c in scores else "-" for c in columns]
        speed = images_per_second(pipe, settings, args.batch, args.repeats)
        print(f"| {name} | {' | '.join(cells)} | {speed:.1f} |", flush=True)
    print(f"\nadherence: strict checker, {args.n} prompts per caption form, the same seeds in every row")


if __name__ == "__main__":
    main()
