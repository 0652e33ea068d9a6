"""Seeded procedural scenes in groups of layouts and edited twins, with captions and exact maps
(depth, seg, soft edges, and the unseen-task maps: canny edges, scribbles, surface normals).

A scene is a JSON-able dict (background + objects); `render(scene, res)` draws the image and every
map from that one description, so the maps are exact by construction. A group is one theme (the
caption template: background, texture, lighting and a set of coloured objects) rendered in several
layouts (horizon, object positions, sizes and which of the objects appear all vary), like the seeds
of an InstructPix2Pix prompt folder; each layout comes with edited twins of itself (recolour, move,
add, remove, new background, new lighting), like a seed's before/after pair.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (235, 235, 235), "black": (30, 30, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "sand": (200, 180, 130), "sky": (130, 180, 230), "grass": (90, 150, 80),
    "brick": (150, 70, 60),
}
TEXTURES = ("plain", "striped", "checkered", "noisy")
KINDS = ("ball", "box", "pyramid", "ring")
# Segmentation palette (ADE20k-style: one fixed colour per class).
SEG_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (120, 120, 120), "floor": (80, 50, 50),
    "ball": (6, 230, 230), "box": (204, 5, 255), "pyramid": (255, 184, 6), "ring": (150, 5, 61),
}
# Every map render() draws; the procedural annotator backend serves each of them.
MODALITIES = ("depth", "hed", "seg", "canny", "scribble", "normal")
EDITS = ("recolour", "move", "add", "remove", "background", "lighting")


def _new_object(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "kind": str(rng.choice(KINDS)),
        "color": str(rng.choice(list(COLORS))),
        "x": float(rng.uniform(0.15, 0.85)),
        "y": float(rng.uniform(0.35, 0.85)),
        "size": float(rng.uniform(0.10, 0.28)),
    }


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    n = int(rng.integers(1, 5))
    return {
        "background": str(rng.choice(list(BACKGROUNDS))),
        "texture": str(rng.choice(TEXTURES)),
        "horizon": float(rng.uniform(0.3, 0.55)),
        "light": float(rng.uniform(-1, 1)),  # light direction, left (-1) to right (+1)
        "objects": [_new_object(rng) for _ in range(n)],
    }


def layout(theme: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The theme's scene laid out anew: its background, texture and lighting; a fresh horizon; each of
    its objects kept with probability 3/4 (at least one), placed and sized afresh."""
    s = copy.deepcopy(theme)
    keep = rng.random(len(s["objects"])) < 0.75
    keep[int(rng.integers(len(keep)))] = True
    s["horizon"] = float(rng.uniform(0.3, 0.55))
    s["objects"] = [{**_new_object(rng), "kind": o["kind"], "color": o["color"]}
                    for o, k in zip(s["objects"], keep) if k]
    return s


def edit_scene(scene: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], str]:
    """One edit of a scene; returns the new scene and the edit's name."""
    s = copy.deepcopy(scene)
    edits = [e for e in EDITS if not (e == "remove" and len(s["objects"]) < 2)
             and not (e == "add" and len(s["objects"]) > 4)]
    edit = str(rng.choice(edits))
    objs = s["objects"]
    if edit == "recolour":
        o = objs[int(rng.integers(len(objs)))]
        o["color"] = str(rng.choice([c for c in COLORS if c != o["color"]]))
    elif edit == "move":
        o = objs[int(rng.integers(len(objs)))]
        o["x"] = float(np.clip(o["x"] + rng.uniform(-0.3, 0.3), 0.1, 0.9))
        o["y"] = float(np.clip(o["y"] + rng.uniform(-0.15, 0.15), 0.3, 0.9))
    elif edit == "add":
        objs.append(_new_object(rng))
    elif edit == "remove":
        objs.pop(int(rng.integers(len(objs))))
    elif edit == "background":
        s["background"] = str(rng.choice([b for b in BACKGROUNDS if b != s["background"]]))
        s["texture"] = str(rng.choice(TEXTURES))
    else:
        s["light"] = float(-s["light"] if abs(s["light"]) > 0.3 else rng.choice([-1.0, 1.0]))
    return s, edit


VISIBLE_FRACTION = 0.25  # a caption names an object only when at least this much of it can be seen
_VISIBILITY_RES = 64     # measured on a fixed grid, so captions do not depend on the render size


def visible_objects(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of `scene` at least `VISIBLE_FRACTION` visible (in frame, not hidden behind nearer
    objects), in the scene's order."""
    yy, xx = np.mgrid[0:_VISIBILITY_RES, 0:_VISIBILITY_RES].astype(np.float64) / _VISIBILITY_RES
    owner = np.full(xx.shape, -1)
    masks = []
    for i, o in sorted(enumerate(scene["objects"]), key=lambda io: io[1]["y"]):  # painter's order, as render()
        mask = _object_mask_and_height(o, xx, yy)[0]
        owner[mask] = i
        masks.append((i, mask))
    area = {i: _object_area(scene["objects"][i]) for i, _ in masks}
    seen = {i: (owner == i).sum() / max(area[i], 1.0) for i, _ in masks}
    return [o for i, o in enumerate(scene["objects"]) if seen[i] >= VISIBLE_FRACTION]


def _object_area(o: dict[str, Any]) -> float:
    """Pixels of the object's whole mask on the visibility grid, frame or no frame (a 3x larger canvas)."""
    n = _VISIBILITY_RES
    yy, xx = (np.mgrid[-n:2 * n, -n:2 * n].astype(np.float64)) / n
    return float(_object_mask_and_height(o, xx, yy)[0].sum())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: dict[str, Any]) -> str:
    """What can be seen, left to right: '<objects> on a <texture> <background> background, lit from <side>'."""
    objs = sorted(visible_objects(scene), key=lambda o: o["x"])
    names = [f"{_article(o['color'])} {o['color']} {o['kind']}" for o in objs]
    things = "" if not names else names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    side = "the left" if scene["light"] < -0.3 else "the right" if scene["light"] > 0.3 else "above"
    where = f"a {scene['texture']} {scene['background']} background, lit from {side}"
    return f"{things} on {where}" if things else where


def _object_mask_and_height(o: dict[str, Any], xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the object and its surface height above its base plane (0..1) for shading/depth."""
    dx, dy, r = xx - o["x"], yy - (o["y"] - o["size"]), o["size"]
    if o["kind"] == "ball":
        d2 = (dx**2 + dy**2) / r**2
        mask = d2 <= 1
        height = np.sqrt(np.clip(1 - d2, 0, 1))
    elif o["kind"] == "box":
        mask = (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
        height = np.where(mask, 1 - 0.3 * np.maximum(np.abs(dx), np.abs(dy)) / r, 0)
    elif o["kind"] == "pyramid":
        t = (dy + r) / (2 * r)  # 0 at apex, 1 at base
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
        height = np.where(mask, 1 - np.abs(dx) / (r + 1e-6), 0)
    else:  # ring
        d = np.sqrt(dx**2 + dy**2) / r
        mask = (d <= 1) & (d >= 0.5)
        height = np.where(mask, 1 - np.abs(d - 0.75) * 4, 0)
    return mask, np.clip(height, 0, 1)


def _texture(scene: dict[str, Any], xx: np.ndarray, yy: np.ndarray, seed: int) -> np.ndarray:
    tex = scene["texture"]
    if tex == "striped":
        return 0.85 + 0.15 * (np.sin(xx * 40) > 0)
    if tex == "checkered":
        return 0.85 + 0.15 * ((np.floor(xx * 8) + np.floor(yy * 8)) % 2)
    if tex == "noisy":
        return 0.85 + 0.15 * np.random.default_rng(seed).random(xx.shape)
    return np.ones_like(xx)


def render(scene: dict[str, Any], res: int, texture_seed: int = 0) -> dict[str, np.ndarray]:
    """Draw the image and its exact maps, all (res, res, 3) uint8: `image`, `depth`, `seg`, `hed`, and
    `canny`, `scribble`, `normal` (the maps of the unseen tasks)."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float64) / res  # (H, W) in [0, 1)
    horizon = scene["horizon"]
    light = scene["light"]
    # 1. background: a wall above the horizon, a floor below it; lighting is a horizontal ramp.
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float64)
    floor = yy >= horizon
    shade = (0.8 + 0.2 * light * (xx - 0.5) * 2)[..., None]
    tone = np.where(floor, 0.75, 1.0)[..., None] * _texture(scene, xx, yy, texture_seed)[..., None]
    image = base * shade * tone
    # Nearness (MiDaS-style inverse depth: near is bright): wall far, floor approaching the camera.
    near = np.where(floor, 0.15 + 0.45 * (yy - horizon) / (1 - horizon), 0.1)
    seg_id = np.where(floor, 1, 0)
    classes = ["background", "floor"]
    # 2. objects, painter's order: the one standing lower (nearer) is drawn last.
    for o in sorted(scene["objects"], key=lambda o: o["y"]):
        mask, height = _object_mask_and_height(o, xx, yy)
        color = np.array(COLORS[o["color"]], dtype=np.float64)
        lit = 0.55 + 0.45 * height + 0.2 * light * (xx - o["x"]) / o["size"]
        obj_near = 0.15 + 0.6 * o["y"] + 0.2 * height
        image = np.where(mask[..., None], color * np.clip(lit, 0.3, 1.2)[..., None], image)
        near = np.where(mask, obj_near, near)
        seg_id = np.where(mask, len(classes), seg_id)
        classes.append(o["kind"])
    palette = np.array([SEG_PALETTE[c] for c in classes], dtype=np.uint8)
    seg = palette[seg_id]
    depth = np.repeat((np.clip(near, 0, 1) * 255)[..., None], 3, axis=2)
    # 3. soft edges: region boundaries and depth steps, blurred (a stand-in for HED's soft edges).
    edges = np.zeros((res, res))
    for a in (seg_id.astype(np.float64), near * 10):
        edges = np.maximum(edges, np.abs(np.diff(a, axis=0, prepend=a[:1])) > 0.5)
        edges = np.maximum(edges, np.abs(np.diff(a, axis=1, prepend=a[:, :1])) > 0.5)
    soft = edges.astype(np.float64)
    blur = (soft + np.roll(soft, 1, 0) + np.roll(soft, -1, 0) + np.roll(soft, 1, 1) + np.roll(soft, -1, 1)) / 5
    hed = np.repeat((np.maximum(soft, blur * 1.5).clip(0, 1) * 255)[..., None], 3, axis=2)
    return {
        "image": np.clip(image, 0, 255).astype(np.uint8),
        "depth": depth.astype(np.uint8),
        "seg": seg,
        "hed": hed.astype(np.uint8),
        "canny": _gray(edges > 0),  # thin binary edges, one pixel wide like Canny's
        "scribble": _gray(_dilate(edges > 0, max(1, res // 64))),  # thick binarised strokes
        "normal": normal_map(near),
    }


def _gray(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, without wrap-around at the borders."""
    out, pad = mask.copy(), np.pad(mask, radius)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= pad[dy:dy + h, dx:dx + w]
    return out


def normal_map(near: np.ndarray) -> np.ndarray:
    """Surface normals of the nearness field, RGB-encoded like ControlNet normal maps: R = right,
    G = up, B = towards the camera, each component n in [-1, 1] stored as (n + 1) * 127.5; a surface
    facing the camera is (128, 128, 255). Nearness is measured in image widths."""
    res = near.shape[0]
    dz_dy, dz_dx = np.gradient(near, 1.0 / res)  # rows go down the image
    n = np.stack([-dz_dx, dz_dy, np.ones_like(near)], axis=-1)  # (H, W, 3): right, up, towards the camera
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return np.clip((n + 1) * 127.5, 0, 255).round().astype(np.uint8)


def make_group(group_seed: int, layouts: int, images_per_layout: int) -> list[list[tuple[dict[str, Any], str]]]:
    """A group: `layouts` layouts of one theme, each as a scene and `images_per_layout` - 1 edits of
    it, every image with its caption. Layout l is drawn from (group_seed, l) alone, so a group with
    more layouts keeps the ones of a group with fewer."""
    theme = sample_scene(np.random.default_rng(group_seed))
    out = []
    for l in range(layouts):
        rng = np.random.default_rng([group_seed, l])
        scene = layout(theme, rng)
        images = [(scene, caption(scene))]
        for _ in range(images_per_layout - 1):
            edited, _edit = edit_scene(scene, rng)
            images.append((edited, caption(edited)))
        out.append(images)
    return out
