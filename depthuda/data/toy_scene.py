"""The toy's procedural street scenes: a pinhole camera, two domain styles, a z-buffered renderer.

Scenes are rendered through a pinhole camera (focal f px, height h m, horizon row v0, pixel
centres at v + 0.5): the ground plane (road, lane markings, sidewalk, terrain) has depth
z = f*h / (v + 0.5 - v0) at row v; facades, hedges, walls and fences are vertical planes beside
the road whose depth is set by the column; cars, buses, people, riders, poles, signs, lights and
trees stand on the ground at random depths with an image size that scales as 1/z. So each class
has a characteristic (x, y, depth) distribution shared by both domains, as the method assumes:
once both are resized to the network's input, a row of the feature grid sees the ground at the
same depth in either domain (the target's lower camera offsets its wider frame's larger vertical
scale), and a column the roadside planes at the same depth. The target differs in appearance
(palette with some colours swapped, haze, tint, contrast, blur, grain) and in the ego vehicle's
bonnet along its bottom rows (labelled ignore): a source-only model is imperfect.

NumPy and PIL only; no TensorFlow. `depthuda.data.toy` writes these scenes in dataset layouts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageFilter

# Internal class indices; `depthuda.data.toy` maps them to each dataset's ids.
CLASSES = ('sky', 'building', 'road', 'sidewalk', 'fence', 'vegetation', 'pole', 'car', 'sign',
           'person', 'bicycle', 'motorcycle', 'light', 'terrain', 'rider', 'bus', 'wall',
           'lanemarking', 'ego')
_K = {name: i for i, name in enumerate(CLASSES)}


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera looking along the road."""
  width: int
  height: int
  focal: float     # pixels
  height_m: float  # metres above the ground plane
  horizon: float   # continuous row of the horizon (pixel v spans [v, v + 1))

  def ground_depth(self, rows: np.ndarray) -> np.ndarray:
    """Depth (m) of the ground seen at integer `rows` below the horizon."""
    return self.focal * self.height_m / (rows + 0.5 - self.horizon)


def source_camera(size: tuple[int, int]) -> Camera:
  """SYNTHIA-like camera for a (W, H) rendering."""
  return Camera(size[0], size[1], 0.55 * size[0], 1.5, 0.47 * size[1])


def target_camera(size: tuple[int, int]) -> Camera:
  """Cityscapes-like camera for a (W, H) rendering of Cityscapes' 2:1 frame: lower, so that at a
  common input size its ground depth per row matches the source camera's within a few percent,
  and its horizon at the same height of the frame."""
  return Camera(size[0], size[1], 0.55 * size[0], 1.25, 0.47 * size[1])


@dataclasses.dataclass(frozen=True)
class Style:
  """A domain's appearance: base colours and image-formation effects."""
  palette: dict[str, tuple[float, float, float]]
  car_colors: tuple[tuple[float, float, float], ...]
  sky: tuple[tuple[float, float, float], tuple[float, float, float]]  # top, horizon
  haze_distance: float  # metres; colours fade towards the sky with depth
  blotch: float         # amplitude of low-frequency shading (grey levels)
  noise: float          # sigma of per-pixel colour noise
  grain: float          # sigma of colourless grain in 2x2 blocks, after blur
  gains: tuple[float, float, float]
  contrast: float
  blur: float           # Gaussian radius at render resolution
  lit_side: int         # facades on this side (+1 right, -1 left) are brighter


_SOURCE_PALETTE = {
    'road': (88, 80, 96), 'lanemarking': (235, 235, 225), 'sidewalk': (170, 120, 150),
    'terrain': (120, 150, 70), 'building': (125, 110, 95), 'window': (60, 80, 110),
    'wall': (175, 160, 120), 'fence': (100, 110, 140), 'vegetation': (50, 135, 45),
    'trunk': (90, 60, 40), 'pole': (150, 150, 150), 'sign': (30, 80, 190), 'light': (40, 40, 40),
    'person': (190, 40, 50), 'skin': (220, 180, 150), 'rider': (230, 120, 20),
    'bicycle': (120, 30, 160), 'motorcycle': (40, 160, 170), 'bus': (220, 190, 40),
    'ego': (30, 30, 35)}
# A real-looking target: muted colours, wall and fence colours swapped, a grey sidewalk close to
# the source's road, olive vegetation, a paler sky, haze.
_TARGET_PALETTE = dict(
    _SOURCE_PALETTE, road=(70, 68, 72), lanemarking=(190, 190, 185), sidewalk=(120, 112, 118),
    terrain=(135, 145, 75), building=(150, 135, 120), window=(90, 90, 85), wall=(100, 110, 140),
    fence=(175, 160, 120), vegetation=(70, 125, 50), sign=(200, 170, 40), person=(120, 50, 60),
    rider=(60, 90, 60), bicycle=(40, 40, 40), motorcycle=(90, 40, 40), bus=(200, 60, 50))
SOURCE_STYLE = Style(
    _SOURCE_PALETTE,
    car_colors=((200, 30, 30), (30, 60, 200), (230, 230, 230), (30, 160, 60), (230, 200, 30)),
    sky=((80, 150, 245), (160, 195, 235)), haze_distance=600.0, blotch=10.0, noise=2.0,
    grain=0.0, gains=(1.0, 1.0, 1.0), contrast=1.0, blur=0.0, lit_side=-1)
TARGET_STYLE = Style(
    _TARGET_PALETTE,
    car_colors=((150, 40, 40), (40, 60, 150), (200, 200, 200), (50, 120, 60), (60, 60, 65)),
    sky=((150, 180, 220), (185, 200, 215)), haze_distance=250.0, blotch=14.0, noise=0.0,
    grain=3.0, gains=(1.04, 1.0, 0.92), contrast=0.9, blur=0.8, lit_side=1)


class _Canvas:
  """Z-buffered class [H, W], depth [H, W] (m) and colour [H, W, 3] images."""

  def __init__(self, cam: Camera, style: Style, scene: dict):
    self.cam, self.style, self.scene = cam, style, scene
    self.cls = np.full((cam.height, cam.width), _K['sky'], np.uint8)
    self.depth = np.full((cam.height, cam.width), np.inf, np.float32)
    fade = np.clip(_centres(cam.height) / max(cam.horizon, 1), 0, 1)[:, None]
    sky = (1 - fade) * np.array(style.sky[0]) + fade * np.array(style.sky[1])
    self.rgb = np.repeat(sky[:, None, :], cam.width, 1).astype(np.float32)

  def paint(self, rows: slice, cols: slice, mask: np.ndarray, depth, cls: str, rgb) -> None:
    """Paints a window's `mask` [h, w] where `depth` (scalar or [h, w]) is nearer."""
    window = self.depth[rows, cols]
    depth = np.broadcast_to(np.asarray(depth, np.float32), window.shape)
    m = mask & (depth < window)
    window[m] = depth[m]
    self.cls[rows, cols][m] = _K[cls]
    colour = self.rgb[rows, cols]
    colour[m] = np.broadcast_to(np.asarray(rgb, np.float32), colour.shape)[m]


def _centres(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.float32) + 0.5


def _ground(canvas: _Canvas, rng: np.random.Generator) -> None:
  """Road, lane markings, sidewalks and terrain on the ground plane."""
  cam, pal, scene = canvas.cam, canvas.style.palette, canvas.scene
  first = int(np.floor(cam.horizon)) + 1
  z = cam.ground_depth(np.arange(first, cam.height))[:, None].astype(np.float32)
  x = (_centres(cam.width)[None] - cam.width / 2) * z / cam.focal + scene['cam_x']
  ax, half, walk = np.abs(x), scene['road_half'], scene['sidewalk']
  near, win = z <= scene['z_end'], (slice(first, cam.height), slice(None))
  dash = np.mod(z + scene['dash_phase'], 6.0) < 3.0
  marks = (np.abs(x) < 0.08) & dash | (np.abs(ax - half + 0.25) < 0.08)
  road = near & (ax < half)
  patchy = 1 + 0.04 * np.sin(z / 2.3 + rng.uniform(0, 6))
  canvas.paint(*win, road & ~marks, z, 'road', np.multiply.outer(patchy, pal['road']))
  canvas.paint(*win, road & marks, z, 'lanemarking', pal['lanemarking'])
  tiles = ((np.mod(z, 1.2) < 0.08) | (np.mod(x, 1.2) < 0.08))[..., None]
  canvas.paint(*win, near & (ax >= half) & (ax < half + walk), z, 'sidewalk',
               np.array(pal['sidewalk']) * (1 - 0.15 * tiles))
  canvas.paint(*win, near & (ax >= half + walk), z, 'terrain', pal['terrain'])


def _side_plane(canvas: _Canvas, x_world: float, z_range: tuple[float, float], height: float,
                cls: str, rgb, windows: bool = False) -> None:
  """A vertical plane at lateral `x_world` along z in `z_range`, `height` m tall."""
  cam = canvas.cam
  with np.errstate(divide='ignore'):
    z = cam.focal * (x_world - canvas.scene['cam_x']) / (_centres(cam.width) - cam.width / 2)
  cols = np.nonzero((z >= z_range[0]) & (z <= z_range[1]))[0]
  if cols.size == 0:
    return
  cols = slice(cols[0], cols[-1] + 1)  # contiguous: z is monotonic on each side
  z = z[None, cols]
  y = cam.height_m - (_centres(cam.height)[:, None] - cam.horizon) * z / cam.focal
  rgb = np.broadcast_to(np.asarray(rgb, np.float32), y.shape + (3,))
  if windows:  # a window grid in facade coordinates (along z, up y)
    grid = (np.mod(z, 3.0) > 0.9) & (np.mod(y, 3.2) > 1.1) & (y > 1.0)
    rgb = np.where(grid[..., None], canvas.style.palette['window'], rgb)
  lit = 1.15 if np.sign(x_world) == canvas.style.lit_side else 0.85
  canvas.paint(slice(None), cols, (y >= 0) & (y <= height), z, cls, rgb * lit)


def _billboard(canvas: _Canvas, z: float, x_centre: float, width: float, height: float, parts,
               y_base: float = 0.0) -> None:
  """A fronto-parallel width x height (m) object at depth z, its bottom y_base above ground.

  `parts` are (class, shape(s, t) -> bool mask, rgb) in box coordinates: s in [0, 1] left to
  right, t in [0, 1] bottom to top.
  """
  cam, scale = canvas.cam, canvas.cam.focal / z
  left = cam.width / 2 + (x_centre - width / 2 - canvas.scene['cam_x']) * scale
  bottom = cam.horizon + (cam.height_m - y_base) * scale
  u0, u1 = max(int(np.floor(left)), 0), min(int(np.ceil(left + width * scale)), cam.width)
  v0, v1 = max(int(np.floor(bottom - height * scale)), 0), min(int(np.ceil(bottom)), cam.height)
  if u0 >= u1 or v0 >= v1:
    return
  s = ((_centres(cam.width)[u0:u1] - left) / (width * scale))[None]
  t = ((bottom - _centres(cam.height)[v0:v1]) / (height * scale))[:, None]
  inside = (s >= 0) & (s <= 1) & (t >= 0) & (t <= 1)
  for cls, shape, rgb in parts:
    canvas.paint(slice(v0, v1), slice(u0, u1), inside & shape(s, t), z, cls, rgb)


def _rect(s0, s1, t0, t1):
  return lambda s, t: (s >= s0) & (s <= s1) & (t >= t0) & (t <= t1)


def _disc(sc, tc, rs, rt, hole=0.0):
  radius2 = lambda s, t: ((s - sc) / rs) ** 2 + ((t - tc) / rt) ** 2
  return lambda s, t: (hole <= radius2(s, t)) & (radius2(s, t) <= 1)


_FULL = _rect(0, 1, 0, 1)


def _roadside(canvas: _Canvas, rng: np.random.Generator, side: int) -> None:
  """Facades, hedges, walls, fences, poles with signs and lights, trees."""
  pal, u, scene = canvas.style.palette, rng.uniform, canvas.scene
  half, z_end = scene['road_half'], scene['z_end']
  curb, edge = side * (half + 0.3), side * (half + scene['sidewalk'])
  z = u(1.0, 6.0)
  while z < z_end:  # facade segments: a building, a hedge or open ground
    length, kind = u(6, 25), rng.choice(3, p=(0.65, 0.2, 0.15))
    back, span = side * (abs(edge) + scene['setback'] + u(0, 3)), (z, z + length)
    if kind == 0:
      tone = np.array(pal['building']) * u(0.8, 1.2, 3)
      _side_plane(canvas, back, span, u(6, 25), 'building', tone, windows=True)
    elif kind == 1:
      _side_plane(canvas, back, span, u(2, 6), 'vegetation', pal['vegetation'])
    if kind == 2 or rng.random() < 0.2:
      _side_plane(canvas, back - side * 0.3, span, u(0.8, 2.5), 'wall', pal['wall'])
    z += length
  if rng.random() < 0.4:
    z = u(3, 25)
    _side_plane(canvas, edge - side * 0.1, (z, z + u(5, 30)), u(0.9, 1.5), 'fence', pal['fence'])
  z = u(3, 12)
  while z < min(z_end, 80):  # poles carrying signs and traffic lights
    pole_height = u(4, 8)
    _billboard(canvas, z, curb, 0.2, pole_height, [('pole', _FULL, pal['pole'])])
    if rng.random() < 0.4:
      shape = _disc(0.5, 0.5, 0.5, 0.5) if rng.random() < 0.5 else _FULL
      _billboard(canvas, z - 0.05, curb, 0.7, 0.7, [('sign', shape, pal['sign'])],
                 y_base=u(2.0, 2.8))
    if rng.random() < 0.3:
      lamps = [('light', _disc(0.5, t, 0.3, 0.1), c) for t, c in (
          (0.8, (220, 40, 30)), (0.5, (230, 180, 20)), (0.2, (40, 200, 80)))]
      _billboard(canvas, z - 0.05, curb - side * 0.2, 0.4, 1.0,
                 [('light', _FULL, pal['light'])] + lamps, y_base=pole_height - 1)
    z += u(10, 20)
  z = u(3, 10)
  while rng.random() < 0.6 and z < min(z_end, 70):  # a row of trees
    radius, trunk, x = u(1.5, 3), u(2, 3), edge - side * 0.6
    _billboard(canvas, z, x, 0.3, trunk, [('vegetation', _FULL, pal['trunk'])])
    _billboard(canvas, z, x, 2 * radius, 1.6 * radius,
               [('vegetation', _disc(0.5, 0.5, 0.5, 0.5), pal['vegetation'])], y_base=trunk - 0.3)
    z += u(8, 15)


def _traffic(canvas: _Canvas, rng: np.random.Generator) -> None:
  """Cars, a bus, pedestrians and riders, standing on the ground."""
  pal, u, style = canvas.style.palette, rng.uniform, canvas.style
  half, walk = canvas.scene['road_half'], canvas.scene['sidewalk']
  side = lambda: rng.choice([-1, 1])
  for _ in range(rng.integers(0, 8)):  # in a lane or parked at the curb
    x = side() * (u(0.4, 0.6) * half if rng.random() < 0.6 else half - 1.1)
    body = np.array(style.car_colors[rng.integers(len(style.car_colors))])
    _billboard(canvas, u(4, 70), x, 1.8, u(1.4, 1.6), [
        ('car', _rect(0, 1, 0.1, 0.55), body), ('car', _rect(0.15, 0.85, 0.55, 1), body * 0.9),
        ('car', _rect(0.22, 0.78, 0.62, 0.93), (40, 50, 60)),
        ('car', _disc(0.2, 0.1, 0.1, 0.1), (20, 20, 20)),
        ('car', _disc(0.8, 0.1, 0.1, 0.1), (20, 20, 20))])
  if rng.random() < 0.35:
    _billboard(canvas, u(10, 60), side() * 0.5 * half, 2.5, 3.2, [
        ('bus', _rect(0, 1, 0.05, 1), pal['bus']),
        ('bus', _rect(0.05, 0.95, 0.55, 0.85), (50, 60, 70))])
  for _ in range(rng.integers(0, 7)):  # pedestrians, mostly on sidewalks
    x = half + u(0.3, walk - 0.3) if rng.random() < 0.8 else u(0, half)
    _billboard(canvas, u(3, 40), side() * x, 0.55, u(1.6, 1.9), [
        ('person', _rect(0.25, 0.75, 0, 0.45), np.array(pal['person']) * 0.5),
        ('person', _rect(0.05, 0.95, 0.42, 0.84), pal['person']),
        ('person', _disc(0.5, 0.92, 0.3, 0.08), pal['skin'])])
  for _ in range(rng.integers(0, 3)):  # riders near the curb, seen side-on
    bike = 'bicycle' if rng.random() < 0.6 else 'motorcycle'
    x, z = side() * (half - u(0.8, 1.5)), u(5, 40)
    hole = 0.4 if bike == 'bicycle' else 0.0  # spoked wheels or solid ones
    _billboard(canvas, z, x, 1.8, 1.0, [
        (bike, _disc(0.2, 0.3, 0.18, 0.3, hole), pal[bike]),
        (bike, _disc(0.8, 0.3, 0.18, 0.3, hole), pal[bike]),
        (bike, _rect(0.2, 0.8, 0.45, 0.75 + 0.15 * (hole == 0)), pal[bike])])
    _billboard(canvas, z - 0.1, x, 0.6, 0.95, [
        ('rider', _rect(0.1, 0.9, 0, 0.8), pal['rider']),
        ('rider', _disc(0.5, 0.88, 0.35, 0.12), pal['skin'])], y_base=0.85)


def render_scene(cam: Camera, style: Style, rng: np.random.Generator, *,
                 ego_vehicle: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders one random scene.

  Returns:
    rgb uint8 [H, W, 3]; classes uint8 [H, W] (indices into `CLASSES`); depth float32 [H, W]
    in metres, inf for the sky.
  """
  u = rng.uniform
  scene = dict(cam_x=u(-1.5, 1.5), road_half=u(3, 6), sidewalk=u(1.5, 3.5), setback=u(0, 3),
               z_end=u(60, 140), dash_phase=u(0, 6))
  canvas = _Canvas(cam, style, scene)
  _ground(canvas, rng)
  for side in (-1, 1):
    _roadside(canvas, rng, side)
  _traffic(canvas, rng)
  for x in np.arange(-60, 60, 12.0):  # blocks closing the end of the street
    _billboard(canvas, scene['z_end'], x, 12.0, u(8, 30),
               [('building', _FULL, np.array(style.palette['building']) * u(0.8, 1.1))])
  if ego_vehicle:  # Cityscapes sees the car's bonnet along the bottom rows
    du = (_centres(cam.width) - cam.width / 2) / (0.6 * cam.width)
    top = cam.height * (1 - 0.08 * np.clip(1 - du ** 2, 0, 1))
    canvas.paint(slice(None), slice(None), _centres(cam.height)[:, None] > top, 0.5, 'ego',
                 style.palette['ego'])
  coarse = Image.fromarray(rng.integers(0, 256, (12, 24), np.uint8))
  blotches = np.asarray(coarse.resize((cam.width, cam.height), Image.BILINEAR)) / 127.5 - 1
  rgb = canvas.rgb * (1 + style.blotch / 255 * blotches)[..., None]
  # Aerial perspective on everything but the sky, which keeps its gradient.
  fog = np.exp(-canvas.depth / style.haze_distance)[..., None]
  fog[canvas.cls == _K['sky']] = 1
  rgb = rgb * fog + np.array(style.sky[1], np.float32) * (1 - fog)
  rgb = (rgb * np.array(style.gains) - 128) * style.contrast + 128
  if style.noise:
    rgb += rng.normal(0, style.noise, rgb.shape)
  image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
  rgb = np.asarray(image.filter(ImageFilter.GaussianBlur(style.blur)), np.float32)
  if style.grain:  # colourless and coarse, so that the PNGs stay small
    grain = rng.normal(0, style.grain, (cam.height // 2 + 1, cam.width // 2 + 1))
    rgb += np.repeat(np.repeat(grain, 2, 0), 2, 1)[:cam.height, :cam.width, None]
  return np.clip(rgb, 0, 255).astype(np.uint8), canvas.cls, canvas.depth
