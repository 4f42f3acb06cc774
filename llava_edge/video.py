"""A video question's frames: N sampled uniformly from a file, as LLaVA-NeXT's own code samples them.

LLaVA-NeXT's video evaluation (``load_video`` in its scripts) takes ``np.linspace(0, total - 1, N,
dtype=int)`` of the video's frames; so does this. The file is decoded by PyAV, with the FFmpeg its wheel
carries (no system ffmpeg), in two passes: the packets are counted without decoding, then the frames are
decoded up to the last one wanted, keeping only those. Everything is bounded: the file's size, the frames
asked for, the frames a file may have, each frame's pixels (the image limits); an unreadable file is one line.

What a family does with the frames (LLaVA-OneVision: each resized to the tile, 2x2-pooled after the
projector, one newline for the whole video) is the family's (:meth:`ImagePath.prepare_video`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .preprocess import check_image_size

MAX_FRAMES = 64  # frames one question may ask for (LLaVA-OneVision was trained with up to 32)
DEFAULT_FRAMES = 8
MAX_VIDEO_BYTES = 2 << 30
MAX_FILE_FRAMES = 500_000  # about 4.6 hours at 30 frames a second: past this, a file is refused unread


@dataclass(frozen=True)
class Video:
    """A video to ask about: a path or the file's bytes, and how many frames to take from it."""

    source: str | Path | bytes
    frames: int = DEFAULT_FRAMES

    def __post_init__(self):
        check_frames(self.frames)

    @property
    def name(self) -> str:
        return "video" if isinstance(self.source, bytes) else str(self.source)


def check_frames(n, option: str = "--frames") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise UserError(f"{option} must be a whole number from 1 to {MAX_FRAMES}, not {n!r}")
    return n


def _open(video: Video):
    try:
        import av
    except ImportError:
        raise UserError("video needs PyAV: pip install 'llava-edge[video]'") from None
    src = video.source
    if isinstance(src, bytes):
        size, handle = len(src), io.BytesIO(src)
    else:
        p = Path(src)
        if not p.is_file():
            raise UserError(f"{p}: no such video file")
        size, handle = p.stat().st_size, str(p)
    if size > MAX_VIDEO_BYTES:
        raise UserError(f"{video.name}: {size / 2**30:.1f} GB, over the {MAX_VIDEO_BYTES >> 30} GB limit for a video")
    try:
        container = av.open(handle, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"{video.name} is not a video PyAV can read ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{video.name} has no video stream")
    return av, container


def llava_next_training_frames(total: int, fps: float, video_fps: float = 1.0, upbound: int = 32) -> list[int]:
    """The frames LLaVA-NeXT's training takes (``process_video_with_decord``): every ``round(fps / video_fps)``-th
    frame from the first (about ``video_fps`` a second), and when that is more than ``upbound`` frames, ``upbound``
    taken uniformly instead (``np.linspace``, the first and the last included). The original's step is 0 for a
    file under half a frame a second (``range`` then fails); here it is at least 1."""
    step = max(1, round(fps / video_fps))
    idx = list(range(0, total, step))
    if upbound > 0 and len(idx) > upbound:
        idx = np.linspace(0, total - 1, upbound, dtype=int).tolist()
    return idx


def read_frames(video: Video, pick=None) -> list[Image.Image]:
    """``video.frames`` RGB frames, sampled uniformly over the file's frames (the first and the last included);
    ``pick(total, fps)``: the frame numbers to take instead (at most :data:`MAX_FRAMES`)."""
    av, container = _open(video)
    try:
        try:
            total = 0
            for packet in container.demux(container.streams.video[0]):
                if packet.size:  # the demuxer ends a stream with an empty packet
                    total += 1
                    if total > MAX_FILE_FRAMES:
                        raise UserError(f"{video.name} has more than {MAX_FILE_FRAMES:,} frames: cut it first")
            if total == 0:
                raise UserError(f"{video.name} has no frames")
            if pick is None:
                wanted = np.linspace(0, total - 1, video.frames, dtype=int)
            else:
                rate = container.streams.video[0].average_rate
                if not rate:
                    raise UserError(f"{video.name} states no frame rate")
                wanted = np.asarray(pick(total, float(rate)), dtype=int)
                if not 1 <= len(wanted) <= MAX_FRAMES or wanted.min() < 0 or wanted.max() >= total:
                    raise UserError(f"{video.name}: {len(wanted)} frames picked of {total}, "
                                    f"1 to {MAX_FRAMES} needed")
            container.seek(0)
            out: dict[int, Image.Image] = {}
            last, keep = int(wanted[-1]), set(wanted.tolist())
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in keep:
                    check_image_size(frame.width, frame.height, False, f"{video.name}'s frame {i}")
                    out[i] = frame.to_image().convert("RGB")
                if i >= last:
                    break
        except av.FFmpegError as e:
            raise UserError(f"{video.name} could not be decoded ({type(e).__name__})") from None
    finally:
        container.close()
    if not out:
        raise UserError(f"{video.name} has no frames that decode")
    # a file whose packets outnumber its frames (rare): the frames it has stand in for the missing ones
    have = sorted(out)
    return [out[max((k for k in have if k <= int(i)), default=have[0])] for i in wanted]
