"""Rank x step heatmaps as PNG files, with nothing but the standard library.

`splice diagnose` must run wherever the CLI runs (a login node, a container without
matplotlib), so this module carries its own PNG encoder (zlib + struct, 8-bit truecolour),
a viridis-like colormap and a 5x7 bitmap font for the labels.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

RGB = tuple[int, int, int]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WHITE: RGB = (255, 255, 255)
INK: RGB = (40, 40, 40)
MISSING: RGB = (205, 205, 205)  # a cell with no sample: lighter than any colormap entry

# Viridis at 0, 1/4, 1/2, 3/4 and 1: perceptually ordered and readable in greyscale.
VIRIDIS: tuple[RGB, ...] = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98),
                            (253, 231, 37))


def colormap(t: float) -> RGB:
    """The colour of `t` in [0, 1] (clamped): dark purple (low) to yellow (high)."""
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    return (round(a[0] + f * (b[0] - a[0])), round(a[1] + f * (b[1] - a[1])),
            round(a[2] + f * (b[2] - a[2])))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """A PNG of `rgb` (row-major, 3 bytes a pixel, no padding): 8-bit truecolour, no filter."""
    stride = 3 * width
    assert len(rgb) == stride * height, "pixel buffer does not match the size"
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


# 5x7 glyphs, one string of 7 rows each; lower case draws as upper case.
_FONT = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... .###. ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "%": "##..# ##..# ...#. ..#.. .#... #..## #..##",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    " ": "..... ..... ..... ..... ..... ..... .....",
}
GLYPH_W, GLYPH_H = 5, 7
SCALE = 2                             # font pixels per glyph pixel
ADVANCE = (GLYPH_W + 1) * SCALE       # horizontal distance between characters
LINE_H = (GLYPH_H + 2) * SCALE


def text_width(s: str) -> int:
    return len(s) * ADVANCE - SCALE if s else 0


class Canvas:
    """An RGB raster with rectangles and text; `png()` encodes it."""

    def __init__(self, width: int, height: int, background: RGB = WHITE) -> None:
        self.width, self.height = width, height
        self.rgb = bytearray(bytes(background) * (width * height))

    def fill(self, x: int, y: int, w: int, h: int, color: RGB) -> None:
        x0, x1 = max(0, x), min(self.width, x + w)
        if x1 <= x0:
            return
        run = bytes(color) * (x1 - x0)
        for row in range(max(0, y), min(self.height, y + h)):
            start = 3 * (row * self.width + x0)
            self.rgb[start:start + len(run)] = run

    def text(self, x: int, y: int, s: str, color: RGB = INK) -> None:
        """Draw `s` with its top-left corner at (x, y)."""
        for i, ch in enumerate(s.upper()):
            rows = _FONT.get(ch, _FONT["?"]).split()
            for gy, row in enumerate(rows):
                for gx, bit in enumerate(row):
                    if bit == "#":
                        self.fill(x + i * ADVANCE + gx * SCALE, y + gy * SCALE, SCALE, SCALE,
                                  color)

    def png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self.rgb))


@dataclass(frozen=True, kw_only=True)
class Heatmap:
    """Values of one quantity per row (a rank) and step; None where nothing was sampled."""

    title: str
    row_labels: tuple[str, ...]
    first_step: int
    values: tuple[tuple[float | None, ...], ...]  # values[row][step - first_step]
    unit: str = "ms"

    @property
    def num_steps(self) -> int:
        return max((len(r) for r in self.values), default=0)

    def value_range(self) -> tuple[float, float] | None:
        present = [v for row in self.values for v in row if v is not None]
        return (min(present), max(present)) if present else None

    def cell_colors(self) -> list[list[RGB]]:
        """Each cell's colour: the minimum maps to the colormap's low end, the maximum to
        its high end, a missing value to grey."""
        lo, hi = self.value_range() or (0.0, 0.0)
        span = hi - lo
        return [[MISSING if v is None else colormap((v - lo) / span if span > 0 else 0.5)
                 for v in (*row, *[None] * (self.num_steps - len(row)))]
                for row in self.values]


def _nice_tick(min_gap_steps: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... at least `min_gap_steps`."""
    k = 1
    while True:
        for m in (1, 2, 5):
            if k * m >= min_gap_steps:
                return k * m
        k *= 10


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


PAD = 12
GRID_W = 720   # the grid's width is about this many pixels, whatever the number of steps
GRID_H = 360   # and its height at most this many
BAR_W = 18


def render(h: Heatmap) -> Canvas:
    """Lay out title, row labels, the grid, the step axis and a colour bar with min/max."""
    nrows, ncols = len(h.row_labels), max(1, h.num_steps)
    cell_w = max(1, min(24, GRID_W // ncols))
    cell_h = max(1, min(28, GRID_H // max(1, nrows)))
    gap = 1 if cell_h >= 8 else 0        # a white line between rows, when rows are tall
    label_every = max(1, math.ceil(LINE_H / cell_h))
    grid_w, grid_h = cell_w * ncols, cell_h * nrows
    label_w = max((text_width(s) for s in h.row_labels), default=0)
    x0, y0 = PAD + label_w + PAD, PAD + 2 * LINE_H
    bar_h = max(grid_h, 8 * LINE_H)
    lo_hi = h.value_range()
    # max, middle, min
    legend = [f"{_fmt(v)} {h.unit}" for v in (lo_hi[1], sum(lo_hi) / 2, lo_hi[0])] if lo_hi else []
    legend_w = max([text_width(s) for s in legend] + [text_width("NO SAMPLE")])
    width = x0 + grid_w + 2 * PAD + BAR_W + PAD + legend_w + PAD
    height = y0 + max(grid_h + 3 * LINE_H + 4 * SCALE, bar_h + 2 * LINE_H) + PAD
    c = Canvas(max(width, PAD + text_width(h.title) + PAD), height)
    c.text(PAD, PAD, h.title)

    for r, colors in enumerate(h.cell_colors()):
        y = y0 + r * cell_h
        for s, color in enumerate(colors):
            c.fill(x0 + s * cell_w, y, cell_w, cell_h - gap, color)
        if r % label_every == 0:
            label = h.row_labels[r]
            c.text(x0 - PAD - text_width(label), y + max(0, (cell_h - GLYPH_H * SCALE) // 2),
                   label)

    # Step axis: ticks at round step numbers, spaced so that their labels do not collide.
    last = h.first_step + ncols - 1
    tick = _nice_tick((text_width(str(last)) + 2 * ADVANCE) / cell_w)
    ty = y0 + grid_h + 2
    first_tick = -(-h.first_step // tick) * tick
    for step in range(first_tick, last + 1, tick):
        x = x0 + (step - h.first_step) * cell_w + cell_w // 2
        c.fill(x, ty, 1, 4, INK)
        label = str(step)
        c.text(min(x - text_width(label) // 2, x0 + grid_w - text_width(label) // 2),
               ty + 6, label)
    c.text(x0 + grid_w // 2 - text_width("STEP") // 2, ty + 6 + LINE_H + SCALE * 3, "STEP")

    # Colour bar: the maximum at the top, the minimum at the bottom, then the missing swatch.
    bx = x0 + grid_w + 2 * PAD
    for i in range(bar_h):
        c.fill(bx, y0 + i, BAR_W, 1, colormap(1 - i / max(1, bar_h - 1)))
    if legend:
        c.text(bx + BAR_W + PAD // 2, y0, legend[0])
        c.text(bx + BAR_W + PAD // 2, y0 + (bar_h - GLYPH_H * SCALE) // 2, legend[1])
        c.text(bx + BAR_W + PAD // 2, y0 + bar_h - GLYPH_H * SCALE, legend[2])
    c.fill(bx, y0 + bar_h + LINE_H // 2, BAR_W, GLYPH_H * SCALE, MISSING)
    c.text(bx + BAR_W + PAD // 2, y0 + bar_h + LINE_H // 2, "NO SAMPLE")
    return c


def heatmap_png(h: Heatmap) -> bytes:
    return render(h).png()


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of a PNG that `encode_png` wrote (filter 0 only): for
    tests and for checking a report's images without an imaging library."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if crc != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"bad CRC in the {kind.decode()} chunk")
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            if (depth, ctype) != (8, 2):
                raise ValueError("only 8-bit truecolour PNGs are decoded")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 3 * width
    rows: Sequence[bytes] = [raw[y * (stride + 1):(y + 1) * (stride + 1)]
                             for y in range(height)]
    if any(r[0] != 0 for r in rows):
        raise ValueError("only unfiltered rows are decoded")
    return width, height, b"".join(r[1:] for r in rows)
