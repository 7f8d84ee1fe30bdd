"""Command line: ``python -m sonic_rt {animate,demo-model,convert,download,serve,batch}`` (also installed as ``sonic-rt``).

Bad input ends with a one-line ``error: <file>: <problem>`` on stderr and exit code 2; Ctrl-C exits 130
and leaves no partial output.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

from .pipeline.options import SCHEDULER_ORDERS

DESCRIPTION = """Sonic talking-head runtime: one portrait + one speech recording -> lip-synced mp4.

  python -m sonic_rt animate --demo --image face.png --audio speech.wav --out out.mp4
  python -m sonic_rt animate --model checkpoints --image face.png --audio speech.wav --out out.mp4

--model takes a directory in the official Sonic checkpoint layout (Sonic/, RIFE/,
stable-video-diffusion-img2vid-xt/, whisper-tiny/, optional yoloface_v5m.pt). --demo uses a small
RANDOM-WEIGHT checkpoint in that layout (created on first use in ~/.cache/sonic_rt): it checks the
install, its video is not a talking face."""


def _add_animate(sub) -> None:
    p = sub.add_parser(
        "animate",
        help="animate a portrait with speech and write an mp4",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Animate a portrait with a speech recording (official Sonic defaults).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="official-layout Sonic checkpoint directory")
    src.add_argument(
        "--demo", action="store_true", help="use the random-weight demo checkpoint (install check; not a talking face)"
    )
    p.add_argument("--image", required=True, help="portrait image (PNG, JPEG, WebP; RGB, grey or RGBA)")
    p.add_argument("--audio", required=True, help="speech audio (wav, mp3, m4a, flac, or a video's audio track)")
    p.add_argument("--out", required=True, help="output .mp4 (written atomically)")
    add_option_flags(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp16", "bf16", "fp32"],
        help="UNet/VAE/CLIP dtype (default: fp16 on cuda, fp32 on cpu; an engine directory's own precision)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "reference", "sdpa", "triton"],
        help="audio-attention implementation of the torch backend: triton (fused kernels, CUDA), sdpa "
        "(exact simplifications; on cpu it skips queries outside the face), reference (official "
        "structure, for checking). auto: triton on cuda where it can run, else sdpa",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile of the UNet. auto (default): shapes already compiled in the on-disk cache run "
        "compiled, others uncompiled; on (--compile alone): compile each new shape once (minutes on a 2-core "
        "CPU the first time, then loaded from the cache); off: never. Compiled frames differ from uncompiled "
        "ones by fp32 rounding (within 2 uint8 levels)",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="for 12 GB GPUs at 512x512: models other than the UNet wait in host memory, one window per UNet "
        "call, the UNet's feed-forward in chunks, 4 frames per VAE decode call (frames near those chunk "
        "edges differ slightly). Slower; off by default",
    )
    p.add_argument(
        "--windows-per-call",
        type=int,
        default=1,
        help="shift-fusion windows batched into one UNet call (batch 3x; engines must be built with "
        "--windows covering it)",
    )
    p.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="workers per device: windows run in parallel on this many lanes (CUDA streams on a GPU, threads "
        "splitting the cores on the CPU)",
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="DEV[,DEV...]|all",
        help="run the windows of this video on several devices, each with a UNet replica: e.g. cuda:0,cuda:1, "
        "or all (every CUDA GPU); cpu,cpu runs two replicas splitting the cores. The first device also runs "
        "everything else. Same video as one device. Default: --device alone. Under torchrun each rank owns "
        "a range of frames instead (one device per rank; rank 0 writes)",
    )
    p.add_argument(
        "--no-split-rows",
        dest="split_rows",
        action="store_false",
        default=argparse.SUPPRESS,  # on unless given: no "(default: True)" under a --no- flag
        help="never split a window's three guidance rows over free devices (by default they are split when "
        "fewer windows are ready than devices are free: the first frames' cone, short videos)",
    )
    p.add_argument(
        "--order",
        default=SCHEDULER_ORDERS[0],
        choices=SCHEDULER_ORDERS,
        help="order of the (step, window) work, same video either way: wavefront runs each window as soon as "
        "its inputs are final, the first frames first, so writing starts after a fixed amount of work "
        "whatever the length; steps runs step by step (the official order)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoint pickles that need arbitrary code (only for files you trust)",
    )


_TYPES = {"int": int, "float": float, "str": str}


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~sonic_rt.pipeline.options.AnimateOptions` field that has one: the name, type,
    default and help (with unit and source) come from the field. A bool option is a switch that sets the
    opposite of its default (``--no-interpolate``, ``--no-crop``, ``--quiet``); left out, the option keeps
    its default."""
    from .pipeline.options import AnimateOptions, cli_flag

    for f in dataclasses.fields(AnimateOptions):
        flag = cli_flag(f)
        if flag is None:
            continue
        meta = f.metadata
        notes = [
            f"unit: {meta['unit']}" if meta["unit"] else None,
            f"official: {meta['source']}" if meta["source"] else None,
        ]
        help_text = meta["flag_help"] + "".join(f"; {n}" for n in notes if n)
        if f.type == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                action="store_false" if f.default else "store_true",
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            kind = _TYPES.get(f.type.removesuffix(" | None"), str)
            parser.add_argument(
                flag, dest=f.name, type=kind, default=f.default, metavar=meta["metavar"], help=help_text
            )


def options_from_args(args: argparse.Namespace):
    """The :class:`~sonic_rt.pipeline.options.AnimateOptions` of parsed ``animate`` arguments (defaults for
    the options without a flag or not given)."""
    from .pipeline.options import AnimateOptions

    return AnimateOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(AnimateOptions) if hasattr(args, f.name)}
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sonic-rt`` argument parser (``animate``, ``demo-model``, ``convert``, ``download``, ``serve``,
    ``batch``)."""
    parser = argparse.ArgumentParser(
        prog="sonic-rt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_animate(sub)
    demo = sub.add_parser("demo-model", help="write the random-weight demo checkpoint (official layout)")
    demo.add_argument("--out", required=True, type=Path, help="directory to create")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    conv = sub.add_parser("convert", help="rewrite the official .pth/.pkl checkpoints as .safetensors")
    conv.add_argument("--model", required=True, type=Path, help="official-layout checkpoint directory")
    conv.add_argument("--trust-pickle", action="store_true", help="allow pickles that need arbitrary code")
    from .download import add_parser as add_download  # the real model from the hub (sonic_rt/download.py)

    add_download(sub)
    from .serving.server import add_parser as add_serve  # the predictions API and web page (sonic_rt/serving/)

    add_serve(sub)
    from .serving.batch import add_parser as add_batch  # many videos from a jobs file, here or on Ray

    add_batch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input or checkpoint, 130 interrupted)."""
    args = build_parser().parse_args(argv)

    from .errors import SonicError

    # SIGTERM unwinds like Ctrl-C, so the writer removes its temporary file and no partial mp4 is left.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        if args.command == "demo-model":
            return _demo_model(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "download":
            from .download import main as download

            return download(args)
        if args.command == "serve":
            from .serving.server import run as serve

            return serve(args)
        if args.command == "batch":
            from .serving.batch import run as batch

            return batch(args)
        return _animate(args)
    except SonicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"error: {exc} (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130


def raise_interrupt(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C so temporary outputs are removed."""
    raise KeyboardInterrupt


def _demo_model(args) -> int:
    from .demo import write_demo_model

    out = write_demo_model(args.out, overwrite=args.overwrite)
    print(f"wrote the RANDOM-WEIGHT demo checkpoint to {out} (for install checks and tests; not a talking face)")
    return 0


def _convert(args) -> int:
    from .checkpoint import convert_checkpoints, resolve_model_dir

    resolve_model_dir(args.model)
    written = convert_checkpoints(args.model, trust_pickle=args.trust_pickle)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("nothing to convert: every checkpoint already has a .safetensors copy")
    return 0


def _animate(args) -> int:
    from . import media
    from .face import FaceBox
    from .runtime import Runtime

    # Cheap checks first, so a typo fails before the models load.
    media.check_output_path(args.out)
    media.load_image(args.image)
    media.probe_audio(args.audio)
    options = options_from_args(args)
    if options.face_box is not None:
        options = dataclasses.replace(options, face_box=FaceBox.from_user(options.face_box))
    if args.demo:
        from .demo import ensure_demo_model

        model_dir = ensure_demo_model()
        print(
            f"using the RANDOM-WEIGHT demo checkpoint at {model_dir}: the video checks the install, "
            "it is not a talking face",
            file=sys.stderr,
        )
    else:
        model_dir = args.model
    from .scheduler import SchedulerConfig

    runtime = Runtime(
        model_dir,
        device=args.device,
        dtype=args.dtype,
        trust_pickle=args.trust_pickle,
        attention=args.attention,
        compile=args.compile,
        low_memory=args.low_memory,
        devices=args.devices,
        scheduler=SchedulerConfig(
            windows_per_call=args.windows_per_call,
            lanes=args.lanes,
            order=args.order,
            split_rows=getattr(args, "split_rows", True),
        ),
    )
    progress = options.progress and runtime.distributed.rank == 0  # rank 0 reports
    result = runtime.animate(args.image, args.audio, args.out, options, progress=progress)
    runtime.close()
    if runtime.distributed.rank != 0:
        return 0  # rank 0 reports and writes
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(
        f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps, {result.width}x{result.height} "
        f"({stages})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
