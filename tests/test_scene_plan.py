"""The window plan of whole-scene prediction (pure geometry): carried out on a NumPy score
buffer it gives every pixel exactly the windows of the whole-scene sliding grid."""

import numpy as np
import pytest

from spectralmoe_jax.evaluation.inference import window_starts
from spectralmoe_jax.evaluation.scene_plan import Emit, Predict, Tiling, plan_windows

CASES = [  # height, width, Tiling(...)
    (301, 463, dict(window=120, overlap=50, batch_size=3, block_width=170)),
    (250, 330, dict(window=96, overlap=40, batch_size=2, block_width=128)),
    (40, 30, dict(window=64, overlap=16)),                        # scene smaller than a window
    (512, 1024, dict(window=256, overlap=0, block_width=256)),    # no overlap, blocks = windows
    (700, 650, dict(window=256, overlap=64, batch_size=1, block_width=300)),
    (97, 300, dict(window=64, overlap=60, batch_size=5, block_width=64)),  # many windows a pixel
]


def coverage(height, width, tiling):
    """Per pixel, the number of whole-scene sliding windows covering it."""
    win_h, win_w = min(tiling.window, height), min(tiling.window, width)
    count = np.zeros((height, width), np.int64)
    for y in window_starts(height, win_h, tiling.stride):
        for x in window_starts(width, win_w, tiling.stride):
            count[y:y + win_h, x:x + win_w] += 1
    return count


def carry_out(plan, tiling):
    """The plan on a NumPy buffer, as `scene.py` does on the device: per pixel, the windows it
    received (as a bit field of window ids) when its row was emitted."""
    win_h, win_w = plan.window
    out = np.zeros((plan.height, plan.width), object)  # bit fields of any length
    written = np.zeros((plan.height, plan.width), np.int64)
    ids = {}
    for block in plan.blocks:
        buffer = np.zeros((win_h, plan.buffer_width), object)
        buffer[...] = 0
        top = 0
        for step in block.steps:
            if isinstance(step, Predict):
                assert step.row == top, "windows are added at the buffer's first row"
                assert 1 <= len(step.columns) <= tiling.batch_size
                for x in step.columns:
                    assert block.left <= x and x - block.left + win_w <= plan.buffer_width
                    bit = ids.setdefault((step.row, x), len(ids))
                    buffer[:, x - block.left:x - block.left + win_w] += 1 << bit
            else:
                assert step.row == top and 0 < step.rows <= win_h
                rows = slice(step.row, step.row + step.rows)
                cols = slice(block.x0 - block.left, block.x1 - block.left)
                out[rows, block.x0:block.x1] = buffer[:step.rows, cols]
                written[rows, block.x0:block.x1] += 1
                buffer = np.concatenate([buffer[step.rows:], np.zeros_like(buffer[:step.rows])])
                top += step.rows
    return out, written, ids


@pytest.mark.parametrize("height, width, fields", CASES)
def test_plan_gives_every_pixel_its_whole_scene_windows(height, width, fields):
    tiling = Tiling(**fields)
    plan = plan_windows(height, width, tiling)
    out, written, ids = carry_out(plan, tiling)
    np.testing.assert_array_equal(written, 1)  # every pixel written exactly once
    # Each pixel holds exactly the windows of the whole-scene grid that cover it, each once.
    win_h, win_w = plan.window
    expected = np.zeros((height, width), object)
    for (y, x), bit in ids.items():
        expected[y:y + win_h, x:x + win_w] |= 1 << bit
    np.testing.assert_array_equal(out, expected)
    ys = window_starts(height, win_h, tiling.stride)
    xs = window_starts(width, win_w, tiling.stride)
    assert {y for y, _ in ids} == set(ys) and {x for _, x in ids} == set(xs)
    counts = np.vectorize(lambda v: bin(v).count("1"))(out)
    np.testing.assert_array_equal(counts, coverage(height, width, tiling))


@pytest.mark.parametrize("height, width, fields", CASES)
def test_plan_blocks_and_counts(height, width, fields):
    tiling = Tiling(**fields)
    plan = plan_windows(height, width, tiling)
    win_h, win_w = plan.window
    assert plan.window == (min(tiling.window, height), min(tiling.window, width))
    xs = window_starts(width, win_w, tiling.stride)
    ys = window_starts(height, win_h, tiling.stride)
    edges = [(b.x0, b.x1) for b in plan.blocks]
    assert edges[0][0] == 0 and edges[-1][1] == width
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    for block in plan.blocks:
        assert block.x1 - block.x0 <= tiling.block_width
        predicted = [x for s in block.steps if isinstance(s, Predict) for x in s.columns]
        # The block's windows: those reaching into its columns, once per row of windows.
        wanted = [x for x in xs if x < block.x1 and x + win_w > block.x0]
        assert sorted(predicted) == sorted(wanted * len(ys))
        assert block.left == wanted[0]
        emits = [s for s in block.steps if isinstance(s, Emit)]
        assert sum(e.rows for e in emits) == height
    # The count the previous scene tests rely on: rows of windows x windows per block.
    assert plan.num_windows == len(ys) * sum(
        len([x for x in xs if x < b.x1 and x + win_w > b.x0]) for b in plan.blocks)


def test_tiling_errors():
    with pytest.raises(ValueError, match="overlap 64 must be in"):
        Tiling(window=64, overlap=64)
    with pytest.raises(ValueError, match="block_width 100 must be at least the window 128"):
        Tiling(window=128, overlap=0, block_width=100)
    with pytest.raises(ValueError, match="blend must be one of"):
        Tiling(blend="gauss")
    with pytest.raises(ValueError, match="nothing to predict"):
        plan_windows(0, 10, Tiling())
