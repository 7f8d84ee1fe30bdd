"""The options of one animation: :class:`AnimateOptions`, the single home of every default.

:meth:`sonic_rt.Runtime.animate`, the CLI's ``animate`` flags (generated from these fields by
:mod:`sonic_rt.cli`), the eager baseline (``bench/eager.py``) and the sampler's own
:class:`~sonic_rt.sampling.SamplingConfig` all read their defaults from here. Each field carries its help
text, its unit and its source (the official ``config/inference/sonic.yaml`` key or code it mirrors, see
docs/official_algorithm.md section 1) in its metadata; :meth:`AnimateOptions.describe` lists them, so a user
interface can build its controls without repeating any of it.

This module imports nothing heavy (no torch), so ``--help`` and a UI can read it cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_SEED = 72589  # official config `seed`
DEFAULT_MIN_RESOLUTION = 512  # official `image_size` / `min_resolution`
# the window scheduler's orders (sonic_rt.scheduler.SchedulerConfig.order), the default first; here, torch-free,
# so that the CLI's --help can list them without importing torch
SCHEDULER_ORDERS = ("wavefront", "steps")


def option(
    default: Any,
    help: str,
    *,
    unit: str | None = None,
    source: str | None = None,
    flag: str | None = "",
    flag_help: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A field of :class:`AnimateOptions` with its description in the metadata.

    Args:
        default: the default value (immutable: the dataclass is frozen and shared).
        help: what the option does, one line.
        unit: the unit of the value ("steps", "frames", "pixels"...), None when it has none.
        source: where the default comes from (the official config key), None for runtime-only options.
        flag: the CLI flag; "" derives ``--name-with-dashes`` from the field name; a bool option whose flag
            starts with ``--no-`` or is ``--quiet`` sets it to False; None: not on the command line.
        flag_help: the CLI help of a switch that sets the opposite of the default (None: ``help``).
        metavar: the CLI metavar (e.g. ``X,Y,W,H``).
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "unit": unit,
            "source": source,
            "flag": flag,
            "flag_help": flag_help or help,
            "metavar": metavar,
        },
    )


@dataclass(frozen=True)
class OptionInfo:
    """One option as a user interface needs it (:meth:`AnimateOptions.describe`).

    Attributes:
        name: the keyword of :meth:`sonic_rt.Runtime.animate` and the :class:`AnimateOptions` field.
        type: the annotation as written (``"int"``, ``"int | None"``, ``"bool"``...).
        default: the default value.
        help, unit, source: as in :func:`option`.
        flag: the CLI flag, or None when the option is not on the command line.
        flag_help: the CLI flag's help (for a switch, what giving it does).
        metavar: the CLI metavar, or None.
    """

    name: str
    type: str
    default: Any
    help: str
    unit: str | None
    source: str | None
    flag: str | None
    flag_help: str
    metavar: str | None


@dataclass(frozen=True)
class AnimateOptions:
    """Every option of :meth:`sonic_rt.Runtime.animate`, with the official defaults.

    Values are checked by :meth:`sonic_rt.Runtime.check_inputs` (``InputError`` before any model runs), not
    here, so building options never fails on a value.

    Attributes:
        steps: denoising steps (official ``num_inference_steps``, 25).
        seed: seed of the initial noise (official ``seed``, 72589); the same seed gives the official noise
            (:func:`sonic_rt.sampling.initial_noise`). The official demo scripts never pass another seed on.
        dynamic_scale: motion bucket scale (official ``motion_bucket_scale`` = gradio ``dynamic_scale``, 1.0;
            gradio allows 0.5-2.0), a finite number >= 0.
        shift_offset: frames the window starts move per step (official ``shift_offset``, alpha = 7), >= 0.
        frames_per_window: window length T in frames at 12.5 fps (official ``n_sample_frames``, 25), >= 1.
        min_resolution: short side of the generated video in pixels, rounded to multiples of 64 (official
            ``image_size`` / ``min_resolution``); None: 512, or the demo checkpoint's own small default.
        interpolate: RIFE x2 to 25 fps, 2N-1 frames (official ``use_interframe``); False writes N frames at
            12.5 fps.
        face_box: explicit face ``(x, y, w, h)`` in image pixels, ``"x,y,w,h"`` or a
            :class:`~sonic_rt.face.FaceBox`; skips detection.
        crop: square-crop around the face (official gradio behaviour) or use the whole image.
        paste_back: every output frame is the original photo at its own size (even, at most
            ``max_output_side``) with the generated crop resized back into its box under a feathered mask, colours
            matched in the blend band (:mod:`sonic_rt.paste_back`); off: the generated frames as they are.
        max_output_side: longest side of a ``paste_back`` video in pixels (1920); larger photos are scaled down.
        hls: also write the video as an HLS stream at this ``.m3u8`` path (:class:`sonic_rt.media.HlsWriter`:
            2-second fMP4 segments with their audio, written as the frames are final), which a player or the
            web page can play while the rest is still being generated; removed if the run fails.
        progress: show progress bars on stderr.
        return_frames: also return the decoded frames before interpolation (always when ``out`` is None).
    """

    steps: int = option(25, "denoising steps", unit="steps", source="num_inference_steps")
    seed: int = option(DEFAULT_SEED, "seed of the initial noise (official default)", source="seed")
    dynamic_scale: float = option(
        1.0, "motion strength (gradio range 0.5-2.0)", unit="x", source="motion_bucket_scale (gradio dynamic_scale)"
    )
    shift_offset: int = option(7, "window shift per step", unit="frames", source="shift_offset")
    frames_per_window: int = option(25, "window length, frames at 12.5 fps", unit="frames", source="n_sample_frames")
    min_resolution: int | None = option(
        None,
        "short side of the video (default 512; 128 for the demo checkpoint)",
        unit="pixels",
        source="image_size / min_resolution (512)",
    )
    interpolate: bool = option(
        True,
        "RIFE x2 to 25 fps (2N-1 frames); off: N frames at 12.5 fps",
        source="use_interframe",
        flag="--no-interpolate",
        flag_help="skip RIFE: N frames at 12.5 fps",
    )
    face_box: tuple[float, float, float, float] | str | None = option(
        None, "face box in image pixels (skips detection)", unit="pixels", metavar="X,Y,W,H"
    )
    crop: bool = option(
        True,
        "square crop around the face; off: the whole image",
        source="gradio crop",
        flag="--no-crop",
        flag_help="use the whole image instead of a square face crop",
    )
    paste_back: bool = option(
        False, "paste the animated crop back into the whole original photo, at its own size", flag="--paste-back"
    )
    max_output_side: int = option(
        1920, "longest side of a --paste-back video (larger photos are scaled down)", unit="pixels"
    )
    hls: str | None = option(
        None,
        "also stream to this HLS playlist: 2 s segments a player can open while the video is generated",
        metavar="PLAYLIST.m3u8",
    )
    progress: bool = option(True, "progress bars on stderr", flag="--quiet", flag_help="no progress bars")
    return_frames: bool = option(False, "also return the decoded frames before interpolation", flag=None)

    @classmethod
    def describe(cls) -> tuple[OptionInfo, ...]:
        """Every option with its type, default, help, unit, source and CLI flag, in field order."""
        return tuple(
            OptionInfo(
                name=f.name,
                type=str(f.type),
                default=f.default,
                help=f.metadata["help"],
                unit=f.metadata["unit"],
                source=f.metadata["source"],
                flag=cli_flag(f),
                flag_help=f.metadata["flag_help"],
                metavar=f.metadata["metavar"],
            )
            for f in dataclasses.fields(cls)
        )

    @classmethod
    def resolve(
        cls, options: AnimateOptions | None = None, overrides: Mapping[str, Any] | None = None, what: str = "animate()"
    ) -> AnimateOptions:
        """``options`` (default: the defaults) with ``overrides`` applied.

        Raises:
            TypeError: an override is not an option (as for an unknown keyword argument of ``what``).
        """
        options = options if options is not None else cls()
        if not isinstance(options, cls):
            raise TypeError(f"{what}: options must be an {cls.__name__}, got {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides or {}) - names)
        if unknown:
            raise TypeError(f"{what} got an unexpected keyword argument {unknown[0]!r}")
        return dataclasses.replace(options, **overrides) if overrides else options


def markdown_table() -> str:
    """The options as a Markdown table (option, default, unit, CLI flag, official source, what it does): the
    README's options table is this text, checked by a test, so it cannot drift from the dataclass."""
    rows = ["| option | default | unit | CLI flag | official source | what |", "|---|---|---|---|---|---|"]
    for o in AnimateOptions.describe():
        flag = f"`{o.flag}`" if o.flag else "(API only)"
        rows.append(
            f"| `{o.name}` | `{o.default!r}` | {o.unit or ''} | {flag} | {o.source or '(sonic_rt)'} | {o.help} |"
        )
    return "\n".join(rows)


def cli_flag(f: dataclasses.Field) -> str | None:
    """The command-line flag of field ``f`` (None when it has none)."""
    flag = f.metadata["flag"]
    return f"--{f.name.replace('_', '-')}" if flag == "" else flag


__all__ = [
    "AnimateOptions",
    "OptionInfo",
    "DEFAULT_SEED",
    "DEFAULT_MIN_RESOLUTION",
    "SCHEDULER_ORDERS",
    "option",
    "cli_flag",
    "markdown_table",
]
