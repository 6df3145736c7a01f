"""The plan of a whole-scene prediction: which windows the model sees, in which order, and
when rows of labels are final. Pure geometry, no I/O (`scene.py` carries it out).

Windows lie on the sliding-window grid of `inference.window_starts`, so that blending them
equals `slide_inference` on the whole scene. Memory must not grow with the scene, so the scene
is cut into column blocks of `block_width` pixels, each swept top to bottom one row of windows
at a time into a score buffer one window high. Before the windows at row y are added, the
buffer's rows above y are final (no window of this or a later row reaches them): an `Emit`
turns them into labels and scrolls the buffer up. Windows straddling two column blocks are
predicted once for each (about window / block_width more work), which keeps the seam exact.
"""

from __future__ import annotations

import dataclasses

from spectralmoe_jax.evaluation.inference import BLENDS, window_starts


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a scene is cut into windows and their scores blended.

    window, overlap: window size and overlap in pixels (stride = window - overlap).
    blend: 'hann' (smooth, seamless) or 'mean' (mmseg's average) blending of scores.
    patch_multiple: each window is padded with zeros to a multiple of it and cropped back.
    tta: average with the horizontally flipped prediction.
    batch_size: windows per model call (the last batch is padded: one compilation).
    block_width: columns per block; the device buffer is about
      window * (block_width + 2 window) * (K + 1) * 4 bytes.
    """
    window: int = 512
    overlap: int = 128
    blend: str = "hann"
    patch_multiple: int = 16
    tta: bool = False
    batch_size: int = 4
    block_width: int = 8192

    def __post_init__(self):
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap {self.overlap} must be in [0, window={self.window})")
        if self.block_width < self.window:
            raise ValueError(f"block_width {self.block_width} must be at least the window "
                             f"{self.window}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {self.blend!r}")
        if self.batch_size < 1 or self.patch_multiple < 1:
            raise ValueError(f"batch_size {self.batch_size} and patch_multiple "
                             f"{self.patch_multiple} must be positive")

    @property
    def stride(self) -> int:
        return self.window - self.overlap


@dataclasses.dataclass(frozen=True)
class Predict:
    """One model call: the windows at scene row `row` and scene columns `columns`."""
    row: int
    columns: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Emit:
    """Scene rows [row, row + rows) of the block are final: to labels, buffer scrolled up."""
    row: int
    rows: int


@dataclasses.dataclass(frozen=True)
class Block:
    """A column block: it writes scene columns [x0, x1); buffer column 0 is scene column
    `left` (its first window's column, at or left of x0)."""
    x0: int
    x1: int
    left: int
    steps: tuple[Predict | Emit, ...]


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    height: int
    width: int
    window: tuple[int, int]  # (h, w): the window shrunk to the scene where it is smaller
    buffer_width: int        # one width for all blocks, so that the device code compiles once
    blocks: tuple[Block, ...]
    # Windows per model call: the tiling's, or fewer when no row of a block has that many (a
    # one-window tile then runs the model once, not once per padded batch slot).
    batch_size: int

    @property
    def num_windows(self) -> int:
        """Windows predicted, counting those repeated at column-block seams."""
        return sum(len(step.columns) for block in self.blocks for step in block.steps
                   if isinstance(step, Predict))


def plan_windows(height: int, width: int, tiling: Tiling) -> WindowPlan:
    """The windows and emits that predict a `height` x `width` scene with `tiling`."""
    if height < 1 or width < 1:
        raise ValueError(f"scene of {height} x {width} pixels has nothing to predict")
    win_h, win_w = min(tiling.window, height), min(tiling.window, width)
    ys = window_starts(height, win_h, tiling.stride)
    xs = window_starts(width, win_w, tiling.stride)
    spans = [(x0, min(x0 + tiling.block_width, width)) for x0 in range(0, width, tiling.block_width)]
    block_columns = [[x for x in xs if x < x1 and x + win_w > x0] for x0, x1 in spans]
    batch_size = min(tiling.batch_size, max(len(columns) for columns in block_columns))
    blocks = []
    for (x0, x1), columns in zip(spans, block_columns):
        steps: list[Predict | Emit] = []
        top = 0  # the scene row of the buffer's first row
        for y in ys:
            if y > top:
                steps.append(Emit(top, y - top))
                top = y
            for start in range(0, len(columns), batch_size):
                steps.append(Predict(y, tuple(columns[start:start + batch_size])))
        steps.append(Emit(top, height - top))
        blocks.append(Block(x0, x1, columns[0], tuple(steps)))
    buffer_width = max(max(step.columns[-1] + win_w - b.left for step in b.steps
                           if isinstance(step, Predict)) for b in blocks)
    return WindowPlan(height, width, (win_h, win_w), buffer_width, tuple(blocks), batch_size)
