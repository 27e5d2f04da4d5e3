#!/usr/bin/env python
"""Generate a small synthetic segmentation dataset in the PASCAL VOC and Cityscapes layouts.

  python tools/make_toy_data.py --out DATA/toy --seed 0 [--num-train 320 --num-val 80]

VOC toy (DATA/toy/pascal_voc): 6 classes = background + 5 shapes (disc, rectangle, triangle, cross, ring).
Each class has its own shape, texture (stripes, checkerboard, dots, waves, speckle) and, for CLASS_HUE_P of
its objects, hue; the rest take any hue. 5% of objects wear another class's texture and some background
blobs carry faint class textures, so no single cue is sure. (With colour carrying no class information at
all, networks trained from scratch stayed near 20 mIoU within the few hundred CPU steps of the quickstart.)
Train labels are palette PNGs (SegmentationClass style), val labels single-channel PNGs (SegmentationClassAug
style); a 2-px band of 255 marks object borders, as in VOC.
City toy (DATA/toy/city): 64x128 street scenes with official labelIds (road 7, sidewalk 8, building 11,
pole 17, vegetation 21, sky 23, person 24, car 26; void: unlabeled 0, ego vehicle 1, static 4).
Every image is a pure function of (seed, layout, split, index): --num-train does not change the others."""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from furnace.data import CITYSCAPES_CLASS_NAMES, VOC_PALETTE, read_list, write_label, write_list, write_partitions
from furnace.data.cityscapes_labels import LABEL_ID_TO_TRAIN_ID
from furnace.data.splits import PARTITIONS

VOC_CLASSES = ["background", "disc", "rectangle", "triangle", "cross", "ring"]
TEXTURE_SWAP_P = 0.05  # chance that an object wears the texture of another class
BLOB_TEXTURE_P = 0.15  # chance that a background distractor blob carries a faint class texture
CLASS_HUES = (0, 36, 72, 108, 144)  # OpenCV hue (0-180) of each object class, 72 degrees apart
CLASS_HUE_P = 0.9  # chance that an object takes its class's hue: colour is a strong cue, not a sure one
HUE_JITTER = 10
TEXTURE_PERIOD = (10, 16)  # px: coarse enough to tell the five textures apart at the networks' stride-4 features
CITY_IDS = dict(unlabeled=0, ego=1, static=4, road=7, sidewalk=8, building=11, pole=17, vegetation=21,
                sky=23, person=24, car=26)


def colour(rng, vivid, cls=None):
    """RGB colour: vivid (objects: saturated, bright) or muted (background: greyish). An object of class
    `cls` takes its class's hue (+-HUE_JITTER) with probability CLASS_HUE_P, any hue otherwise."""
    if vivid:
        if cls is not None and rng.random() < CLASS_HUE_P:
            hue = (CLASS_HUES[cls - 1] + rng.integers(-HUE_JITTER, HUE_JITTER + 1)) % 180
        else:
            hue = rng.integers(0, 180)
        hsv = np.uint8([[[hue, rng.integers(150, 256), rng.integers(150, 256)]]])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)
    return rng.uniform(70, 190) + rng.uniform(-25, 25, 3)


def texture(kind, h, w, rng, vivid=True, cls=None):
    """HxWx3 float texture of class `kind` (1 stripes, 2 checkerboard, 3 dots, 4 waves, 5 speckle), with a
    random period (TEXTURE_PERIOD px), orientation and phase; two shades of a vivid colour, or of a muted colour at
    low contrast (background distractors)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, p = rng.uniform(0, np.pi), rng.uniform(*TEXTURE_PERIOD)
    u = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, p)
    v = -xx * np.sin(a) + yy * np.cos(a) + rng.uniform(0, p)
    if kind == 1:
        t = np.sin(2 * np.pi * u / p) > 0
    elif kind == 2:
        t = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    elif kind == 3:
        t = (u % p - p / 2) ** 2 + (v % p - p / 2) ** 2 < (0.3 * p) ** 2
    elif kind == 4:
        t = np.sin(2 * np.pi * (u + 0.3 * p * np.sin(np.pi * v / p)) / p) > 0
    else:
        t = cv2.resize((rng.random(((h + 1) // 2, (w + 1) // 2)) < 0.5).astype(np.uint8), (w, h),
                       interpolation=cv2.INTER_NEAREST) > 0
    c1 = colour(rng, vivid, cls)
    c2 = c1 * rng.uniform(0.25, 0.55) if vivid else c1 + rng.choice([-1, 1]) * rng.uniform(20, 35)
    return np.where(t[..., None], c2, c1)


def fill(mask, points):
    """Fill the polygon `points` (Nx2 float x, y) with 1 in the uint8 mask; returns the mask."""
    return cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)


def shape_mask(kind, h, w, cx, cy, s, rng):
    """uint8 mask of shape `kind` (1 disc, 2 rectangle, 3 triangle, 4 cross, 5 ring), size ~s px."""
    m = np.zeros((h, w), np.uint8)
    ang = rng.uniform(0, 360)
    if kind == 1:
        cv2.ellipse(m, (int(cx), int(cy)), (int(s / 2), int(s / 2 * rng.uniform(0.8, 1))), ang, 0, 360, 1, -1)
    elif kind == 2:
        fill(m, cv2.boxPoints(((cx, cy), (s * rng.uniform(0.75, 1), s * rng.uniform(0.55, 0.9)), ang)))
    elif kind == 3:
        t = np.deg2rad(ang + np.array([0, 120, 240]) + rng.uniform(-12, 12, 3))
        fill(m, np.stack([cx + 0.6 * s * np.cos(t), cy + 0.6 * s * np.sin(t)], 1))
    elif kind == 4:
        arm = s * rng.uniform(0.26, 0.34)
        for da in (0, 90):
            fill(m, cv2.boxPoints(((cx, cy), (s, arm), ang + da)))
    else:
        cv2.circle(m, (int(cx), int(cy)), int(s / 2), 1, -1)
        cv2.circle(m, (int(cx), int(cy)), int(s / 2 * rng.uniform(0.45, 0.6)), 0, -1)
    return m > 0


def blob_mask(h, w, rng):
    """An irregular polygon (not one of the classes' shapes) for background distractors."""
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 20)
    t = np.sort(rng.uniform(0, 2 * np.pi, 9))
    rad = r * rng.uniform(0.5, 1.3, 9)
    return fill(np.zeros((h, w), np.uint8), np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)) > 0


def finish(img, rng, noise=5.0):
    """Slight blur (camera optics) and sensor noise, to uint8."""
    img = cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0.7)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def voc_sample(rng):
    """(RGB uint8 image, label uint8 with 0..5 and 255 borders) of size H in [88, 112], W in [112, 144]."""
    h, w = int(rng.integers(88, 113)), int(rng.integers(112, 145))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: a colour gradient + low-frequency colour noise + low-contrast strokes and textured blobs
    c0, c1 = colour(rng, False), colour(rng, False)
    a = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(a) + yy * np.sin(a)
    t = ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]
    img = c0 * (1 - t) + c1 * t + cv2.resize(rng.normal(0, 15, (4, 5, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(3, 9)):
        p0, p1 = rng.uniform(0, w, 2), rng.uniform(0, h, 2)
        cv2.line(img, (int(p0[0]), int(p1[0])), (int(p0[1]), int(p1[1])),
                 (img.mean((0, 1)) + rng.uniform(-40, 40, 3)).tolist(), int(rng.integers(1, 3)))
    for _ in range(rng.integers(1, 4)):
        m = blob_mask(h, w, rng)
        fill = texture(int(rng.integers(1, 6)), h, w, rng, vivid=False) if rng.random() < BLOB_TEXTURE_P else colour(rng, False)
        img = np.where(m[..., None], fill, img)
    # objects, painted in order (later ones occlude earlier ones)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, 6))
        m = shape_mask(cls, h, w, rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h, rng.uniform(20, 54), rng)
        tex = cls if rng.random() >= TEXTURE_SWAP_P else int(rng.choice([k for k in range(1, 6) if k != cls]))
        img = np.where(m[..., None], texture(tex, h, w, rng, cls=cls), img)
        label[m] = cls
    # VOC-style ignore band: pixels whose 3x3 neighbourhood holds two classes (1 px on each side of a border)
    k = np.ones((3, 3), np.uint8)
    label[cv2.dilate(label, k) != cv2.erode(label, k)] = 255
    return finish(img, rng, 4.0), label


def city_sample(rng, h=64, w=128):
    """(RGB uint8 image, uint8 labelIds) of a street scene seen from a car."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img, lab = np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.uint8)

    def paint(mask, colour, label_id):
        img[mask] = colour[mask] if np.ndim(colour) == 3 else colour
        lab[mask] = CITY_IDS[label_id]

    def noisy(colour, sigma):
        return np.asarray(colour, np.float32) + rng.normal(0, sigma, (h, w, 1)).astype(np.float32)

    hor = int(h * rng.uniform(0.38, 0.5))  # horizon row
    grey = rng.uniform(0, 0.8)  # overcast: sky towards grey
    sky = (1 - grey) * np.array([100, 150, 230]) + grey * 200 + rng.uniform(-20, 20, 3)
    paint(yy < hor, sky + (yy / hor)[..., None] * 30, "sky")
    x = -int(rng.integers(0, 10))
    while x < w:  # a row of buildings with window grids, with gaps of sky between some
        bw = int(rng.integers(12, 40))
        if rng.random() < 0.85:
            top = int(rng.integers(2, hor - 3))
            col = rng.uniform(50, 210) + rng.uniform(-30, 30, 3)
            win = ((xx - x) % 6 < 3) & ((yy - top) % 7 < 3) & (yy > top + 2)
            body = (xx >= x) & (xx < x + bw) & (yy >= top) & (yy < hor + 2)
            paint(body, noisy(col, 4) - win[..., None] * rng.uniform(30, 70), "building")
        x += bw
    vx, half = w * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.6)  # vanishing point, road half-width
    frac = np.clip((yy - hor) / (h - hor), 0, 1)  # perspective: 0 at the horizon, 1 at the bottom row
    road = (yy >= hor) & (np.abs(xx - vx) < 1 + frac * half)
    tiles = (((xx % 5) < 1) | ((yy % 4) < 1))[..., None] * -25
    paint((yy >= hor + 1) & ~road, noisy(rng.uniform(100, 190) + rng.uniform(-20, 20, 3), 5) + tiles, "sidewalk")
    paint(road, noisy(rng.uniform(55, 120) + rng.uniform(-5, 5, 3), 6), "road")
    dash = road & (np.abs(xx - vx) < 0.5 + frac * 1.5) & ((frac * 40 + rng.uniform(0, 6)) % 6 < 3)
    img[dash] = 230  # lane marking: part of the road

    def on_sidewalk(y):  # an x on either sidewalk at row y
        return vx + rng.choice([-1, 1]) * (1 + (y - hor) / (h - hor) * half) * rng.uniform(1.1, 1.6)

    for _ in range(rng.integers(0, 4)):  # trees: trunk + leafy crown
        y = rng.uniform(hor + 1, hor + 0.5 * (h - hor))
        x, sc = on_sidewalk(y), (y - hor) / (h - hor)
        r = 4 + 10 * sc
        crown = np.zeros((h, w), np.uint8)
        for _ in range(3):
            c = (int(x + rng.uniform(-r, r) * 0.5), int(y - 2 * r + rng.uniform(-r, r) * 0.4))
            cv2.circle(crown, c, int(r * rng.uniform(0.6, 1.0)), 1, -1)
        trunk = (np.abs(xx - x) < 1 + sc) & (yy < y) & (yy > y - 2 * r)
        leaves = noisy(np.array([50, 110, 40]) + rng.uniform(-20, 20, 3), 18)
        paint(trunk, np.array([90, 70, 50]), "vegetation")
        paint(crown > 0, leaves, "vegetation")
    for _ in range(rng.integers(0, 3)):  # poles
        y = rng.uniform(hor + 1, h)
        x, sc = on_sidewalk(y), (y - hor) / (h - hor)
        paint((np.abs(xx - x) < 0.8 + 1.2 * sc) & (yy < y) & (yy > y - 12 - 35 * sc), np.array([120, 120, 120]), "pole")
    for y in np.sort(rng.uniform(hor + 3, h - 2, rng.integers(0, 5))):  # cars, far ones first
        sc = (y - hor) / (h - hor)
        cw = 6 + 36 * sc
        x = vx + rng.uniform(-0.6, 0.6) * (1 + sc * half)
        col = rng.uniform(0, 255, 3)
        body = (np.abs(xx - x) < cw / 2) & (yy < y) & (yy > y - 0.3 * cw)
        cabin = (np.abs(xx - x) < cw / 3) & (yy <= y - 0.3 * cw) & (yy > y - 0.5 * cw)
        wheels = np.minimum((xx - x + cw / 3) ** 2, (xx - x - cw / 3) ** 2) + (yy - y) ** 2 < (0.1 * cw + 0.7) ** 2
        for part, c in ((body, col), (cabin, col * 0.4 + 60), (wheels, np.array([20, 20, 20]))):
            paint(part, c, "car")
    for _ in range(rng.integers(0, 5)):  # pedestrians: head, torso, legs
        y = rng.uniform(hor + 2, h)
        x, ph = on_sidewalk(y), 6 + 22 * (y - hor) / (h - hor)
        legs = (np.abs(xx - x) < ph * 0.1) & (yy < y) & (yy >= y - 0.45 * ph)
        torso = (np.abs(xx - x) < ph * 0.14) & (yy < y - 0.45 * ph) & (yy >= y - 0.85 * ph)
        head = (xx - x) ** 2 + (yy - (y - 0.92 * ph)) ** 2 < (0.09 * ph) ** 2 + 0.5
        for part, c in ((legs, rng.uniform(0, 120, 3)), (torso, rng.uniform(0, 255, 3)), (head, [220, 180, 150])):
            paint(part, np.asarray(c), "person")
    if rng.random() < 0.4:  # a static object (bin, bench): void
        y = rng.uniform(hor + 2, h)
        x, sz = on_sidewalk(y), 2 + 6 * (y - hor) / (h - hor)
        paint((np.abs(xx - x) < sz / 2) & (yy < y) & (yy > y - sz), rng.uniform(30, 120, 3), "static")
    if rng.random() < 0.3:  # an unlabeled region
        paint(blob_mask(h, w, rng), rng.uniform(0, 255, 3), "unlabeled")
    if rng.random() < 0.5:  # ego-vehicle bonnet at the bottom: void
        e = rng.uniform(3, 8)
        paint(yy >= h - e * (1 - 0.6 * ((xx - w / 2) / (w / 2)) ** 2), np.array([30, 30, 35]), "ego")
    return finish(img, rng, 4.0), lab


def generate(out, seed=0, num_train=320, num_val=80, num_city_train=200, num_city_val=40, log=print):
    """Write out/pascal_voc and out/city (images, labels, lists, partitions, toy_meta.json); returns the metas."""
    voc, city = Path(out) / "pascal_voc", Path(out) / "city"
    for split, n in (("train_aug", num_train), ("val", num_val)):
        names = [f"{split[:5].rstrip('_')}_{i:06d}" for i in range(n)]  # train_000000, val_000000
        (voc / split / "image").mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            image, label = voc_sample(np.random.default_rng([seed, 0, split == "val", i]))
            cv2.imwrite(str(voc / split / "image" / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            # train: palette PNG (SegmentationClass style), val: single-channel PNG (SegmentationClassAug style)
            write_label(voc / split / "label" / f"{name}.png", label, VOC_PALETTE if split == "train_aug" else None)
        write_list(voc / "lists" / f"{split}.txt", names)
    # partitions 1/d that leave at least one labeled image
    write_partitions(read_list(voc / "lists" / "train_aug.txt"), voc / "lists",
                     [d for d in PARTITIONS if num_train // d], seed)
    for split, n, cities in (("train", num_city_train, ("toyburg", "toyhausen")), ("val", num_city_val, ("toyfurt",))):
        names = [f"{split}/{c}/{c}_000000_{i:06d}" for i, c in ((i, cities[i % len(cities)]) for i in range(n))]
        for i, name in enumerate(names):
            image, label_ids = city_sample(np.random.default_rng([seed, 1, split == "val", i]))
            (city / "leftImg8bit" / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(city / "leftImg8bit" / f"{name}_leftImg8bit.png"), image[..., ::-1])
            write_label(city / "gtFine" / f"{name}_gtFine_labelIds.png", label_ids)
        write_list(city / "lists" / f"{split}.txt", names)
    write_partitions(read_list(city / "lists" / "train.txt"), city / "lists",
                     [d for d in PARTITIONS if num_city_train // d], seed)
    metas = dict(pascal_voc=dict(dataset="voc", num_classes=len(VOC_CLASSES), class_names=VOC_CLASSES),
                 city=dict(dataset="cityscapes", num_classes=19, class_names=CITYSCAPES_CLASS_NAMES, label_ids=CITY_IDS,
                           present_classes=sorted({int(LABEL_ID_TO_TRAIN_ID[v]) for v in CITY_IDS.values()} - {255})))
    for (layout, meta), counts in zip(metas.items(), ((num_train, num_val), (num_city_train, num_city_val))):
        meta.update(seed=seed, num_train=counts[0], num_val=counts[1], ignore_index=255)
        (Path(out) / layout / "toy_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        log(f"wrote {Path(out) / layout} ({counts[0]} train, {counts[1]} val; seeded partitions, seed {seed}: the "
            "published ones are for the real datasets)")
    return metas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="DATA/toy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-train", type=int, default=320, help="VOC toy train images")
    ap.add_argument("--num-val", type=int, default=80, help="VOC toy val images")
    ap.add_argument("--num-city-train", type=int, default=200)
    ap.add_argument("--num-city-val", type=int, default=40)
    t0 = time.time()
    generate(**vars(ap.parse_args(argv)))
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
