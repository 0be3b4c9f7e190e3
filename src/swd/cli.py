"""The ``swd`` command line.

Every subcommand takes ``--config FILE`` and any number of ``key.sub=value`` overrides, and
saves the resolved config beside what it writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import DEMO_CONFIG, load_config

EPILOG = "Overrides: any config key as key.sub=value, e.g. pretrain.steps=100 model.num_layers=2 output_dir=runs/x"


RESUME_HELP = "'auto' (latest checkpoint in output_dir if any, default), 'never', or a checkpoint dir"

# name -> (one-line help, description, extra arguments: (flag, default, help))
COMMANDS = {
    "pretrain": (
        "train the built-in teacher (flow matching, multi-scale batches)",
        "Flow-matching training of the built-in SD3-transformer teacher on Fashion-MNIST or an image "
        "folder with metainfo.csv. Batches rotate over every size of the scale schedule. Checkpoints go to "
        "OUTPUT_DIR/checkpoints, the EMA model to OUTPUT_DIR/model, tensorboard logs to OUTPUT_DIR/pretrain.",
        (("--resume", "auto", RESUME_HELP),),
    ),
    "distill": (
        "distill a teacher into a few-step scale-wise (or full-resolution) student",
        "Scale-wise Distillation: trains a student (a LoRA adapter on the frozen teacher, or a full copy) "
        "with any subset of the DMD, GAN and MMD losses (distill.loss.*_weight), stages rotating over schedule.sizes "
        "(distill.mode=scalewise) or all at the final size (distill.mode=fullres). Checkpoints go to "
        "OUTPUT_DIR/checkpoints (resume with --resume auto), tensorboard scalars to OUTPUT_DIR/distill, preview "
        "grids to OUTPUT_DIR/samples, the student to OUTPUT_DIR/student (merged) and OUTPUT_DIR/student_lora. "
        "Runs on several processes with accelerate launch or torchrun.",
        (("--resume", "auto", RESUME_HELP),),
    ),
    "sample": (
        "write a PNG grid from a model (teacher Euler or a scale-wise schedule)",
        "Sample a model directory (checkpoint=DIR) with the teacher's guided Euler sampler "
        "(sample.mode=teacher, teacher.steps / teacher.guidance) or a scale-wise schedule (sample.mode=scalewise, "
        "schedule.sizes / schedule.sigmas). Writes OUTPUT_DIR/samples.png, and with sample.intermediates=true "
        "OUTPUT_DIR/steps.png: one column per step, so the resolution can be seen to grow.",
        (),
    ),
    "eval": (
        "FID (Inception-v3), precision / recall, class accuracy or CLIP score, seconds per image of a model",
        "Generate eval.num_samples images (eval.mode=teacher or scalewise) and measure FID and precision / recall / "
        "density / coverage against eval.reference (a folder of images or an .npz of mu / sigma; class-conditional "
        "models default to the Fashion-MNIST test set; statistics cached), class accuracy with the shipped classifier "
        "(class models) or the CLIP score of eval.clip (text models, prompts from eval.prompts: a .txt or a .csv with a "
        "caption or prompt column), and seconds per image. Writes OUTPUT_DIR/eval.json and prints a one-line summary.",
        (("--name", None, "name for this row of results (default: the mode)"),),
    ),
    "bench": (
        "sampling and training speed measured side by side (JSON, Markdown, PNG)",
        "Times, interleaved in one run (median of bench.repeats rounds): SwD n-step sampling, full "
        "resolution n and n/2 steps, the guided teacher; one distillation iteration (distill.* settings) for the full "
        "loss and MMD only, scale-wise and full resolution; the peak memory of a full-loss step and the parameters "
        "held. checkpoint= picks the backbone (default model.pretrained, then distill.teacher): a built-in or swd model "
        "directory or an SD3 / FLUX pipeline. Writes OUTPUT_DIR/bench.{json,md,png}.",
        (),
    ),
    "make-data": (
        "write a training set of teacher samples (images + metainfo.csv) from a prompt file or the teacher's classes",
        "Sample make_data.num_images images from a teacher (checkpoint=DIR or model.pretrained=PIPELINE) with "
        "teacher.steps / teacher.shift / teacher.guidance at the schedule's final size. "
        "Image i uses prompt i % len(prompts) (make_data.prompts: one per line), or for a class-conditioned teacher "
        "class i % num_classes, and seed make_data.seed + i. Writes "
        "OUTPUT/images/NNNNNNN.png and OUTPUT/metainfo.csv (index,file_name,caption[,label]), OUTPUT = make_data.output_dir or "
        "data.root. Reruns resume (existing images are kept, the CSV is rewritten); several processes (accelerate launch, "
        "torchrun) share the missing images.",
        (),
    ),
    "schedule": (
        "recommend a scale-wise schedule (sizes + sigmas) from the data's power spectrum",
        "Measures the radially averaged power spectrum of the clean data (data.*, spectral.num_images of it) at the "
        "final size in the model's space (pixels, or the VAE latents of an SD3 / FLUX pipeline: checkpoint=, "
        "model.pretrained= or distill.teacher), picks spectral.steps sigmas on the teacher grid (or takes spectral.sigmas), "
        "and gives each step the smallest size, in multiples of the patch size, that hides at most spectral.tolerance of "
        "its signal above the noise, or fits the token budget spectral.token_ratio. Writes OUTPUT_DIR/schedule.yaml "
        "(schedule.sizes / schedule.sigmas for swd distill), schedule.json and schedule.png, and prints a table.",
        (),
    ),
    "demo": (
        "distil the shipped teacher briefly, then compare teacher, undistilled and SwD student",
        "A short SwD distillation of the shipped teacher (distill.steps, 300 generator updates), then a table of the teacher "
        "at its guided step count, the same teacher on the 4-step scale-wise schedule (not distilled) and the SwD "
        "student: FID (eval.num_samples vs eval.reference_images test images), class accuracy, network evaluations and "
        "seconds per image. Writes grids, side_by_side.png, student_steps.png and demo.json to OUTPUT_DIR (default "
        "runs/demo). Without --config it uses the demo config shipped with swd. Rerunning resumes the distillation.",
        (),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swd",
        description="Scale-wise Distillation (SwD) of flow-matching diffusion models.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, description, extra) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description, epilog=EPILOG)
        p.add_argument("--config", "-c", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        for flag, default, text in extra:
            p.add_argument(flag, default=default, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    config_path = args.config
    if args.command == "demo":
        config_path = config_path or DEMO_CONFIG
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides.append("output_dir=runs/demo")
    try:
        config = load_config(config_path, overrides)
    except (ValueError, FileNotFoundError) as err:  # bad config: unknown key, ill-typed value, missing file
        print(f"swd {args.command}: {err}", file=sys.stderr)
        return 2
    try:
        return _run(args, config)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        # bad input or a diverged run: the message says what is wrong; SWD_DEBUG=1 shows the traceback
        if os.environ.get("SWD_DEBUG"):
            raise
        print(f"swd {args.command}: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, config) -> int:
    # Commands are imported when they run: `swd --help` and config errors answer without loading
    # torch and diffusers (seconds on a cold start).
    if args.command == "pretrain":
        from .train.pretrain import pretrain  # lazy: torch, diffusers

        print(f"model written to {pretrain(config, resume=args.resume)}")
    elif args.command == "distill":
        from .distill.trainer import distill  # lazy: torch, diffusers, peft

        print(f"student written to {distill(config, resume=args.resume)}")
    elif args.command == "sample":
        from .commands import run_sample  # lazy: torch, diffusers

        for path in run_sample(config):
            print(f"wrote {path}")
    elif args.command == "eval":
        from .commands import run_eval  # lazy: torch, diffusers, torchmetrics

        print(json.dumps(run_eval(config, name=args.name)))
    elif args.command == "bench":
        from .bench import run_bench  # lazy: torch, diffusers, peft

        run_bench(config)
    elif args.command == "make-data":
        from accelerate import PartialState  # lazy: torch

        from .make_data import make_data  # lazy: torch, diffusers

        folder = make_data(config)
        if PartialState().is_main_process:
            print(f"wrote {folder}")
    elif args.command == "schedule":
        from .spectral_schedule import run_schedule  # lazy: torch, diffusers, matplotlib

        for path in run_schedule(config):
            print(f"wrote {path}")
    elif args.command == "demo":
        from .commands import run_demo  # lazy: torch, diffusers, torchmetrics

        for path in run_demo(config):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
