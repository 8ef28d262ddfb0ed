"""Random frames of each training video, a pure function of (seed, epoch, index), like the image views.

EnsembleNet's YouTube-8M models train on 25 randomly sampled frames of each video and are evaluated
on all of them (paper section 4.2). The draw is the YouTube-8M starter code's (`SampleRandomFrames`,
which its DBoF uses): `count` frame positions uniform over the video's own frames, with replacement,
in the order drawn, so every video gives exactly `count` frames, a short one some of them twice.
The positions come from the integer hash of data/views.py, so a video's frames never depend on the
batch it sits in, the batch order or the device (a teacher cache stores outputs for exact views).
"""

from __future__ import annotations

import torch

from .views import hash_ints

_STREAM_FRAMES = 0x4F4


def check_frames_per_video(count) -> int | None:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"frames_per_video must be a positive integer (or null: every frame), got {count!r}.")
    return count


def frame_positions(num_frames: torch.Tensor, indices: torch.Tensor, *, epoch: int, seed: int,
                    count: int) -> torch.Tensor:
    """(B, count) int64 positions into each video's frames: floor(u·n) with u uniform in [0, 1)."""
    h = hash_ints(seed, epoch, indices.to(torch.int64), _STREAM_FRAMES)  # (B,)
    u = hash_ints(h[:, None], torch.arange(count, device=indices.device))  # (B, count), 32-bit
    return (u * num_frames.to(torch.int64)[:, None]) >> 32


def sample_frames(x: torch.Tensor, num_frames: torch.Tensor, indices: torch.Tensor, *, epoch: int, seed: int,
                  count: int) -> torch.Tensor:
    """(B, count, D) frames drawn from the zero-padded (B, T, D) batch `x` of the videos `indices`."""
    pos = frame_positions(num_frames.to(x.device), indices.to(x.device), epoch=epoch, seed=seed, count=count)
    return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))


class SampledFrames:
    """What a video loader (train flag, seed, frames_per_video) adds to show drawn frames in training."""

    train: bool
    seed: int
    frames_per_video: int | None = None

    def frames(self, x: torch.Tensor, num_frames: torch.Tensor, idx: torch.Tensor, view_epoch: int | None):
        """The frames a batch shows: all of them, or in training `frames_per_video` drawn ones."""
        if not self.train or self.frames_per_video is None or view_epoch is None:
            return x
        return sample_frames(x, num_frames, idx, epoch=view_epoch, seed=self.seed, count=self.frames_per_video)

    def views_fingerprint(self) -> dict:
        """What the training inputs depend on besides the data (the teacher cache compares it)."""
        return {} if self.frames_per_video is None else {"frames_per_video": self.frames_per_video}
