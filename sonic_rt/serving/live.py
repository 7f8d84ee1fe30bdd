"""A job's live stream: the HLS stream the runtime writes while it makes the video, announced segment by segment and
served by this server, so a page or a client plays the first seconds while the rest is generated.

The runtime writes the stream (``AnimateOptions.hls``, :class:`sonic_rt.media.HlsWriter`): ``live.m3u8`` (an
``EVENT`` playlist, ended with ``#EXT-X-ENDLIST`` when the video is complete), ``live_init.mp4`` (the fMP4 init
segment) and ``live_00000.m4s``, ... (2-second segments of H.264 video and AAC audio), each segment and each
rewrite of the playlist written under a temporary name and renamed, so a file that has its final name is complete.
A segment is announced (:meth:`LiveStream.scan`) once the playlist lists it, never before, and each announced
segment is also served as a self-contained mp4 (the init segment followed by that segment: a fragmented mp4 any
player or PyAV decodes on its own).

Each job's stream lives in ``workdir/streams/<token>/``, where ``<token>`` is the unguessable name of its output
(``/outputs/<token>.mp4``), so the stream's links are exactly as private as the output's. The folder is removed at
once when the job fails or is canceled, and with the output after ``--keep-outputs`` when it succeeded
(:class:`~sonic_rt.serving.jobs.Jobs`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAYLIST = "live.m3u8"  # the playlist's name in a job's stream folder; HlsWriter names the rest after its stem
INIT = "live_init.mp4"
# Media types (RFC 8216 section 4 for the playlist; IANA's video/iso.segment for an fMP4 media segment).
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_TYPE = "video/iso.segment"
MP4_TYPE = "video/mp4"
# Players open a playlist without #EXT-X-ENDLIST at its live edge (hls.js: three target durations from the end),
# which would skip what was made before the page looked; this tag starts them at the beginning (RFC 8216 4.3.5.2).
START_AT_BEGINNING = "#EXT-X-START:TIME-OFFSET=0"

_SEGMENT_NAME = re.compile(r"^live_(\d{5,9})\.m4s$")
_SELF_CONTAINED = re.compile(r"^(\d{1,9})\.mp4$")


@dataclass(frozen=True)
class Playlist:
    """What a playlist says: the segments' file names and durations (seconds), in order, and whether it has ended."""

    segments: tuple[tuple[str, float], ...]
    ended: bool


def read_playlist(path: Path) -> Playlist:
    """Read an HLS media playlist (the ``#EXTINF:<seconds>,`` line before each segment's URI; ``#EXT-X-ENDLIST``).

    Returns an empty, unended playlist when the file does not exist yet (no segment is finished).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Playlist((), False)
    segments, duration, ended = [], None, False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif line and not line.startswith("#") and duration is not None:
            segments.append((line, duration))
            duration = None
    return Playlist(tuple(segments), ended)


def with_start_tag(text: str) -> str:
    """The playlist ``text`` with :data:`START_AT_BEGINNING` after its ``#EXTM3U`` line (unless it has one)."""
    if "#EXT-X-START:" in text:
        return text
    head, _, rest = text.partition("\n")
    return f"{head}\n{START_AT_BEGINNING}\n{rest}"


class LiveStream:
    """One job's stream folder and the segments announced from it.

    Args:
        folder: ``workdir/streams/<token>`` (created here; it must not exist).
        base_url: the URL of the folder as served (``http://host/streams/<token>/``).

    Attributes:
        segments: the announced segments, in order: ``{"index", "url", "start_seconds", "end_seconds"}``.
        ended: the playlist has ended (the video is complete).
    """

    def __init__(self, folder: Path, base_url: str):
        self.folder, self.base_url = Path(folder), base_url
        self.folder.mkdir(parents=True)
        self.segments: list[dict[str, Any]] = []
        self.ended = False

    @property
    def playlist(self) -> Path:
        """The playlist the runtime writes (``AnimateOptions.hls``)."""
        return self.folder / PLAYLIST

    def scan(self, final: bool = False) -> list[dict[str, Any]]:
        """The segments the playlist lists now that were not announced before (each complete on disk); they are
        added to :attr:`segments`.

        Args:
            final: the job has succeeded (its runner returned). Until then an ended playlist is not read: the writer
                also ends it while it aborts (closing the muxer flushes the cut-short last segment and the ending
                just before the files are deleted), so its last segment is announced only once the job succeeded.
        """
        playlist = read_playlist(self.playlist)
        if playlist.ended and not final:
            return []
        new = []
        start = self.segments[-1]["end_seconds"] if self.segments else 0.0
        for index in range(len(self.segments), len(playlist.segments)):
            _, duration = playlist.segments[index]
            end = round(start + duration, 6)
            new.append(
                {"index": index, "url": f"{self.base_url}{index}.mp4", "start_seconds": start, "end_seconds": end}
            )
            start = end
        self.segments += new
        self.ended = playlist.ended
        return new

    def describe(self) -> dict[str, Any] | None:
        """The prediction's ``stream`` field (a new object each call), or None before the first segment."""
        if not self.segments:
            return None
        return {"playlist": f"{self.base_url}{PLAYLIST}", "segments": list(self.segments), "ended": self.ended}

    def remove(self) -> None:
        """Delete the folder and everything in it."""
        shutil.rmtree(self.folder, ignore_errors=True)


def event(segment: dict[str, Any], playlist: str) -> dict[str, Any]:
    """The SSE ``output`` event of one segment: Cog's ``chunk`` (the segment's self-contained mp4) and ``index``, plus
    ``kind`` (``"segment"``), the seconds of video it covers and the playlist's URL."""
    return {
        "chunk": segment["url"],
        "index": segment["index"],
        "kind": "segment",
        "start_seconds": segment["start_seconds"],
        "end_seconds": segment["end_seconds"],
        "playlist": playlist,
    }


def part(folder: Path, name: str) -> tuple[str, Any] | None:
    """What ``GET /streams/<token>/<name>`` answers from a stream folder, or None (404).

    Returns:
        ``(media type, body)``: the playlist (``str``, with :data:`START_AT_BEGINNING`), the init segment or a media
        segment (a ``Path``), or segment ``N`` as a self-contained mp4 (``bytes``: init + segment), served only
        once the playlist lists it.
    """
    if name == PLAYLIST:
        try:
            return PLAYLIST_TYPE, with_start_tag((folder / PLAYLIST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
    if name == INIT or _SEGMENT_NAME.match(name):
        path = folder / name
        return ((MP4_TYPE if name == INIT else SEGMENT_TYPE), path) if path.is_file() else None
    match = _SELF_CONTAINED.match(name)
    if match is None:
        return None
    index, listed = int(match[1]), read_playlist(folder / PLAYLIST).segments
    if index >= len(listed):
        return None  # not finished (so not announced) yet
    try:
        return MP4_TYPE, (folder / INIT).read_bytes() + (folder / Path(listed[index][0]).name).read_bytes()
    except FileNotFoundError:  # removed meanwhile (the job was canceled)
        return None


__all__ = [
    "LiveStream",
    "Playlist",
    "read_playlist",
    "with_start_tag",
    "event",
    "part",
    "PLAYLIST",
    "PLAYLIST_TYPE",
    "SEGMENT_TYPE",
    "MP4_TYPE",
    "START_AT_BEGINNING",
]
