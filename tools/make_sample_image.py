"""Write ``refghost/data/sample.png``: a small synthetic test scene (our own work, CC0-1.0).

The scene is 480x360 RGB: a sky gradient with soft clouds, a sun disc with a glow, a hilly
horizon, textured ground, a house (wall, roof, door, window), a pond, a bush, a road and a few
coloured blocks. Edges are anti-aliased by 4x4 supersampled coverage, and seeded smooth value
noise plus a little per-pixel grain give the flat regions some texture, so the image has edges,
flat areas, gradients and colour, roughly like a photograph.

The output is deterministic:

* the only randomness is ``np.random.default_rng(SEED).random`` (uniform doubles);
* pixel values use only IEEE basic arithmetic and ``sqrt`` (no ``sin``/``exp``, whose last bit
  can vary between NumPy builds) and no reductions, so the pixels are the same on any platform;
* the PNG is written by Pillow without metadata, so running the script twice with the same
  Pillow/zlib gives a byte-identical file.

Usage::

    python tools/make_sample_image.py            # writes refghost/data/sample.png
    python tools/make_sample_image.py --out x.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH = 480
HEIGHT = 360
SEED = 20240611
SUPERSAMPLE = 4  # coverage samples per axis for anti-aliased shape edges

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "refghost" / "data" / "sample.png"


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise(rng: np.random.Generator, cells_x: int, cells_y: int) -> np.ndarray:
    """Smooth noise in [0, 1), shape (HEIGHT, WIDTH): random lattice values, smoothstep-blended."""
    lattice = rng.random((cells_y + 1, cells_x + 1))
    gx = (np.arange(WIDTH) + 0.5) * (cells_x / WIDTH)
    gy = (np.arange(HEIGHT) + 0.5) * (cells_y / HEIGHT)
    ix = np.minimum(gx.astype(np.int64), cells_x - 1)
    iy = np.minimum(gy.astype(np.int64), cells_y - 1)
    tx = _smoothstep(gx - ix)[None, :]
    ty = _smoothstep(gy - iy)[:, None]
    v00 = lattice[iy[:, None], ix[None, :]]
    v01 = lattice[iy[:, None], ix[None, :] + 1]
    v10 = lattice[iy[:, None] + 1, ix[None, :]]
    v11 = lattice[iy[:, None] + 1, ix[None, :] + 1]
    top = v00 + (v01 - v00) * tx
    bottom = v10 + (v11 - v10) * tx
    return top + (bottom - top) * ty


def _fractal_noise(rng: np.random.Generator, base_cells: int, octaves: int) -> np.ndarray:
    """Sum of value-noise octaves, roughly in [0, 1)."""
    total = np.zeros((HEIGHT, WIDTH))
    amplitude = 0.5
    norm = 0.0
    for octave in range(octaves):
        cells = base_cells * (2**octave)
        total = total + amplitude * _value_noise(rng, cells, max(1, (cells * 3) // 4))
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def _coverage(inside) -> np.ndarray:
    """Fraction of SUPERSAMPLE**2 sub-pixel samples for which ``inside(x, y)`` is true.

    ``inside`` receives sample coordinates of shape (HEIGHT*S, WIDTH*S) in pixel units (pixel
    (0, 0) covers [0, 1) x [0, 1)) and returns a boolean array of that shape.
    """
    s = SUPERSAMPLE
    xs = (np.arange(WIDTH * s) + 0.5) / s
    ys = (np.arange(HEIGHT * s) + 0.5) / s
    mask = inside(xs[None, :], ys[:, None]).astype(np.float64)
    mask = np.broadcast_to(mask, (HEIGHT * s, WIDTH * s))
    # Mean over each s x s block, summed in a fixed order (no reduction-order dependence).
    acc = np.zeros((HEIGHT, WIDTH))
    for dy in range(s):
        for dx in range(s):
            acc = acc + mask[dy::s, dx::s]
    return acc / (s * s)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    """Alpha-blend ``colour`` (3 floats or an (H, W, 3) array) over ``canvas`` with ``alpha``."""
    a = alpha[..., None]
    return canvas * (1.0 - a) + np.asarray(colour, dtype=np.float64) * a


def _horizon(x: np.ndarray) -> np.ndarray:
    """y coordinate of the hill line at column x (a smooth cubic, no trigonometry)."""
    t = x / WIDTH
    return 228.0 - 60.0 * t * (1.0 - t) * (1.0 - 0.9 * t) + 10.0 * t


def make_sample_image(seed: int = SEED) -> np.ndarray:
    """Render the scene.

    Returns
    -------
    img : (360, 480, 3) uint8
        RGB pixels.
    """
    rng = np.random.default_rng(seed)
    x = (np.arange(WIDTH) + 0.5)[None, :]
    y = (np.arange(HEIGHT) + 0.5)[:, None]

    # Sky: vertical gradient from deep blue to a pale horizon, with soft clouds.
    t = np.broadcast_to(y / 240.0, (HEIGHT, WIDTH))
    top = np.array([38.0, 88.0, 168.0])
    low = np.array([186.0, 212.0, 236.0])
    canvas = top + (low - top) * np.minimum(t, 1.0)[..., None]
    clouds = _fractal_noise(rng, 4, 4)
    cloud_alpha = np.clip((clouds - 0.52) * 3.5, 0.0, 0.85) * np.clip(1.2 - t, 0.0, 1.0)
    canvas = _paint(canvas, cloud_alpha, [246.0, 246.0, 250.0])

    # Sun: a disc with a soft glow falling off with squared distance.
    sun_x, sun_y, sun_r = 384.0, 68.0, 27.0
    d2 = (x - sun_x) ** 2 + (y - sun_y) ** 2
    glow = np.clip(1.0 - d2 / (110.0**2), 0.0, 1.0)
    canvas = _paint(canvas, 0.55 * glow * glow, [255.0, 236.0, 180.0])
    sun = _coverage(lambda sx, sy: (sx - sun_x) ** 2 + (sy - sun_y) ** 2 <= sun_r**2)
    canvas = _paint(canvas, sun, [255.0, 246.0, 206.0])

    # Ground: below a hilly horizon, green fading to olive, with grass texture.
    ground = _coverage(lambda sx, sy: sy >= _horizon(sx))
    depth = np.clip((y - 200.0) / 160.0, 0.0, 1.0)
    grass_tex = _fractal_noise(rng, 12, 3)
    g_near = np.array([92.0, 128.0, 48.0])
    g_far = np.array([120.0, 160.0, 80.0])
    ground_rgb = g_far + (g_near - g_far) * np.broadcast_to(depth, (HEIGHT, WIDTH))[..., None]
    ground_rgb = ground_rgb * (0.82 + 0.36 * grass_tex)[..., None]
    canvas = _paint(canvas, ground, ground_rgb)

    # Road: a trapezoid narrowing towards the horizon.
    def road(sx, sy):
        v = (sy - 236.0) / (360.0 - 236.0)
        centre = 300.0 + 40.0 * v
        half = 6.0 + 90.0 * v
        return (sy >= 236.0) & (np.abs(sx - centre) <= half)

    canvas = _paint(canvas, _coverage(road), [128.0, 122.0, 114.0])

    # Pond: an ellipse with a lighter reflection band.
    pond = _coverage(lambda sx, sy: ((sx - 110.0) / 70.0) ** 2 + ((sy - 318.0) / 22.0) ** 2 <= 1.0)
    pond_rgb = np.array([52.0, 96.0, 150.0]) + np.array([40.0, 50.0, 50.0]) * np.clip(
        1.0 - np.abs(y - 312.0) / 6.0, 0.0, 1.0
    )[..., None]
    canvas = _paint(canvas, pond, pond_rgb)

    # House: wall, roof, door and window.
    wall = _coverage(lambda sx, sy: (sx >= 150.0) & (sx <= 252.0) & (sy >= 176.0) & (sy <= 262.0))
    canvas = _paint(canvas, wall, [214.0, 196.0, 160.0])
    roof = _coverage(
        lambda sx, sy: (sy <= 178.0) & (sy >= 128.0 + np.abs(sx - 201.0) * (50.0 / 62.0))
    )
    canvas = _paint(canvas, roof, [150.0, 52.0, 40.0])
    door = _coverage(lambda sx, sy: (sx >= 188.0) & (sx <= 212.5) & (sy >= 218.0) & (sy <= 262.0))
    canvas = _paint(canvas, door, [96.0, 62.0, 36.0])
    window = _coverage(lambda sx, sy: (sx >= 160.5) & (sx <= 180.0) & (sy >= 192.0) & (sy <= 210.5))
    canvas = _paint(canvas, window, [170.0, 210.0, 230.0])

    # Bush: two overlapping ellipses with a dark leafy texture.
    bush = _coverage(
        lambda sx, sy: (((sx - 270.0) / 26.0) ** 2 + ((sy - 252.0) / 16.0) ** 2 <= 1.0)
        | (((sx - 292.0) / 20.0) ** 2 + ((sy - 258.0) / 12.0) ** 2 <= 1.0)
    )
    leaf_tex = _fractal_noise(rng, 40, 2)
    canvas = _paint(canvas, bush, np.array([40.0, 92.0, 36.0]) * (0.7 + 0.6 * leaf_tex)[..., None])

    # Coloured blocks in the foreground (one rotated by shearing its edges).
    blue_box = _coverage(lambda sx, sy: (sx >= 392.0) & (sx <= 452.0) & (sy >= 268.0) & (sy <= 330.0))
    canvas = _paint(canvas, blue_box, [44.0, 70.0, 190.0])
    yellow_box = _coverage(
        lambda sx, sy: (sy >= 286.0)
        & (sy <= 346.0)
        & (sx >= 22.0 + 0.25 * (sy - 286.0))
        & (sx <= 64.0 + 0.25 * (sy - 286.0))
    )
    canvas = _paint(canvas, yellow_box, [232.0, 196.0, 40.0])
    ball = _coverage(lambda sx, sy: (sx - 360.0) ** 2 + (sy - 320.0) ** 2 <= 17.0**2)
    shade = np.clip(1.0 - np.sqrt((x - 354.0) ** 2 + (y - 314.0) ** 2) / 30.0, 0.0, 1.0)
    ball_rgb = np.array([150.0, 30.0, 120.0]) + np.array([90.0, 80.0, 90.0]) * shade[..., None]
    canvas = _paint(canvas, ball, ball_rgb)

    # Vignette (squared radius, no transcendental functions) and a little per-pixel grain.
    r2 = ((x - WIDTH / 2) / WIDTH) ** 2 + ((y - HEIGHT / 2) / HEIGHT) ** 2
    canvas = canvas * (1.0 - 0.35 * r2)[..., None]
    grain = (rng.random((HEIGHT, WIDTH, 3)) + rng.random((HEIGHT, WIDTH, 3)) - 1.0) * 3.0
    canvas = canvas + grain

    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def write_sample_image(path: Path | str = DEFAULT_OUT, seed: int = SEED) -> Path:
    """Render the scene and save it as an 8-bit RGB PNG without metadata; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_sample_image(seed)).save(path, format="PNG", optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output PNG (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"noise seed (default: {SEED})")
    args = parser.parse_args(argv)
    out = write_sample_image(args.out, args.seed)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
