"""Procedural chest-radiograph phantoms: random specs with known findings, their labels, and the drawing.

Why: the embedded demonstrator model must be trained and checked offline. Phantoms give unlimited
images whose findings are known exactly, so an analytic scorer (phantoms.score) can tell whether a
model draws what the prompt asks for. Their report captions are phantoms.captions; a data set on disk
is phantoms.dataset.

Demographics: every phantom has a sex and an age with cues a radiologist would name: breast soft-tissue
shadows over the lower zones in women; with age, fainter bones (osteopenia), an unfolded aortic knob and,
over 65, a calcified rim on it. The cues step at the age bands' edges (<40, 40-65, >65; a phantom
simplification, so a band can be read back from the image); race has no honest phantom cue and is not drawn.

Conventions: PA view, so the patient's LEFT is on the IMAGE RIGHT. Geometry is in unit coordinates
(u = x / size, v = y / size); each structure adds "density" D, and the image is 1 - exp(-gain * D),
so bones and metal saturate the way they do on film.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np

from cxrcommon.demographics import AGE_BANDS

SIDES = ("left", "right")
EFFUSION_SIZES = ("small", "moderate", "large")
ZONES = ("upper", "mid", "lower")
DEVICES = ("et_tube", "central_line", "pacemaker")
FINDINGS = ("effusion", "cardiomegaly", "consolidation", "pneumothorax", "nodule", "devices", "text")
DEFAULT_PROBS: dict[str, float] = {"effusion": 0.3, "cardiomegaly": 0.25, "consolidation": 0.2,
                                   "pneumothorax": 0.15, "nodule": 0.12, "devices": 0.25, "text": 0.5}
CARDIOMEGALY_CTR = 0.55  # CTR above this is labelled cardiomegaly
# fluid height above the costophrenic angle, as a fraction of lung height, per effusion size
EFFUSION_HEIGHT = {"small": (0.10, 0.16), "moderate": (0.28, 0.38), "large": (0.50, 0.62)}
SEXES = ("F", "M")
AGE_RANGE = (20, 90)  # ages drawn uniformly from this range, both ends included
# per age band (<40, 40-65, >65): bone density, extra aortic knob radius (u), calcified knob rim
BONE_DENSITY = (1.0, 0.7, 0.4)
KNOB_UNFOLDING = (0.0, 0.02, 0.04)
KNOB_CALCIFIED = (False, False, True)
_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class PhantomSpec:
    """Every parameter of one phantom; labels and captions are functions of it alone."""
    seed: int = 0                    # fine detail: rib jitter, lung markings, noise
    cx: float = 0.5                  # midline (image u)
    half_width: float = 0.35         # inner thoracic half-width (u)
    lung_top: float = 0.13           # lung apex (v)
    cp_right: float = 0.76           # costophrenic angle of the patient's right lung (image left)
    cp_left: float = 0.78            # ... of the patient's left lung (image right)
    dome_rise: float = 0.11          # dome height above the costophrenic angles
    ctr: float = 0.45                # cardiothoracic ratio
    gain: float = 1.35               # film density -> brightness
    gamma: float = 1.0               # exposure curve
    effusion: str = "none"           # none|left|right|bilateral
    effusion_size: str = "none"      # none|small|moderate|large
    consolidation: str = "none"      # none or "<side>_<zone>", e.g. "right_lower"
    pneumothorax: str = "none"       # none|left|right
    pneumothorax_size: float = 0.0   # fraction of the lung that collapsed away from the wall
    nodule: str = "none"             # none or "<side>_<zone>"
    nodule_radius: float = 0.0       # u
    devices: tuple[str, ...] = ()    # subset of DEVICES
    text: tuple[tuple[str, float, float, float], ...] = ()  # (string, u, v, cap height in u)
    sex: str = "M"                   # M|F: breast shadows in F
    age: int = 30                    # years: bone density and the aortic knob follow its band

    @property
    def age_level(self) -> int:
        """0, 1, 2 for the age bands <40, 40-65, >65 (cxrcommon.demographics.AGE_BANDS)."""
        return next(k for k, (_, lo, hi) in enumerate(AGE_BANDS) if lo <= self.age < hi)

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > CARDIOMEGALY_CTR

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "PhantomSpec":
        d = dict(d)
        d["devices"] = tuple(d.get("devices", ()))
        d["text"] = tuple(tuple(t) for t in d.get("text", ()))
        return cls(**d)


# ----------------------------------------------------------------------------- sampling

def sample_spec(rng: np.random.Generator, *, exclude: Iterable[str] = (),
                finding_probs: Mapping[str, float] | None = None) -> PhantomSpec:
    """Random anatomy plus independent findings; `exclude` names findings that never occur."""
    probs = dict(DEFAULT_PROBS)
    probs.update(finding_probs or {})
    bad = (set(probs) | set(exclude)) - set(FINDINGS)
    if bad:
        raise ValueError(f"unknown finding(s) {sorted(bad)}; valid: {', '.join(FINDINGS)}")
    for name in exclude:
        probs[name] = 0.0
    has = {k: bool(rng.random() < p) for k, p in probs.items()}
    u = rng.uniform
    cp_r = u(0.73, 0.79)
    kw: dict = dict(seed=int(rng.integers(2**31)), cx=u(0.47, 0.53), half_width=u(0.33, 0.38),
                    lung_top=u(0.10, 0.15), cp_right=cp_r, cp_left=cp_r + u(0.0, 0.03),
                    dome_rise=u(0.08, 0.13), gain=u(1.2, 1.5), gamma=u(0.85, 1.2),
                    ctr=u(0.56, 0.68) if has["cardiomegaly"] else u(0.38, 0.50))
    if has["effusion"]:
        kw["effusion"] = str(rng.choice(["left", "right", "bilateral"], p=[0.4, 0.4, 0.2]))
        kw["effusion_size"] = str(rng.choice(EFFUSION_SIZES))
    if has["consolidation"]:
        kw["consolidation"] = f"{rng.choice(SIDES)}_{rng.choice(ZONES)}"
    if has["pneumothorax"]:
        kw["pneumothorax"] = str(rng.choice(SIDES))
        kw["pneumothorax_size"] = u(0.15, 0.40)
    if has["nodule"]:
        kw["nodule"] = f"{rng.choice(SIDES)}_{rng.choice(ZONES)}"
        kw["nodule_radius"] = u(0.015, 0.03)
    if has["devices"]:
        k = int(rng.integers(1, 4))
        kw["devices"] = tuple(sorted(rng.choice(DEVICES, size=k, replace=False).tolist()))
    if has["text"]:
        kw["text"] = _sample_text(rng)
    # drawn last, so the rest of a seed's spec is what it was before phantoms had demographics
    kw["sex"] = str(rng.choice(SEXES))
    kw["age"] = int(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1))
    return PhantomSpec(**kw)


def _sample_text(rng: np.random.Generator) -> tuple[tuple[str, float, float, float], ...]:
    """Side marker on the correct side (L on image right), plus PORTABLE and/or a date in corners."""
    items = []
    marker = str(rng.choice(["L", "R"]))
    mu = rng.uniform(0.80, 0.90) if marker == "L" else rng.uniform(0.04, 0.12)
    items.append((marker, mu, rng.uniform(0.04, 0.14), rng.uniform(0.05, 0.07)))
    corners = [(0.03, 0.93), (0.03, 0.04)] if marker == "L" else [(0.55, 0.93), (0.50, 0.04)]
    rng.shuffle(corners)
    if rng.random() < 0.6:
        items.append(("PORTABLE", corners[0][0], corners[0][1], rng.uniform(0.03, 0.04)))
    if rng.random() < 0.6:
        y, m, d = int(rng.integers(2005, 2024)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        date = f"{m:02d}/{d:02d}/{y}" if rng.random() < 0.5 else f"{y}-{m:02d}-{d:02d}"
        items.append((date, corners[1][0], corners[1][1], rng.uniform(0.025, 0.035)))
    return tuple(items)


# ----------------------------------------------------------------------------- labels

def labels(spec: PhantomSpec) -> dict:
    """Flat structured labels (strings, floats, bools) for metadata columns and scoring."""
    out = {"effusion": spec.effusion, "effusion_size": spec.effusion_size,
           "cardiomegaly": spec.cardiomegaly, "ctr": round(spec.ctr, 4),
           "consolidation": spec.consolidation, "pneumothorax": spec.pneumothorax,
           "nodule": spec.nodule, **{d: d in spec.devices for d in DEVICES},
           "burnt_in_text": bool(spec.text), "sex": spec.sex, "age": spec.age}
    out["normal"] = (spec.effusion == "none" and not spec.cardiomegaly and spec.consolidation == "none"
                     and spec.pneumothorax == "none" and spec.nodule == "none")
    return out


# ----------------------------------------------------------------------------- drawing helpers

class _Canvas:
    """Unit-coordinate drawing onto float32 layers via anti-aliased 8-bit cv2 calls."""

    def __init__(self, size: int):
        self.size = size
        self.px = np.arange(size, dtype=np.float32) / size + 0.5 / size

    def pts(self, uv: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(uv, np.float64) * self.size * _ONE).astype(np.int32).reshape(-1, 1, 2)

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.size)))

    def poly(self, *polys: np.ndarray) -> np.ndarray:
        m = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(m, [self.pts(p) for p in polys], 255, cv2.LINE_AA, _SHIFT)
        return m.astype(np.float32) / 255.0

    def lines(self, polylines: Sequence[np.ndarray], width: float, value: float = 1.0) -> np.ndarray:
        m = np.zeros((self.size, self.size), np.uint8)
        cv2.polylines(m, [self.pts(p) for p in polylines], False, int(255 * value), self.width(width),
                      cv2.LINE_AA, _SHIFT)
        return m.astype(np.float32) / 255.0

    def disc(self, u: float, v: float, r: float) -> np.ndarray:
        m = np.zeros((self.size, self.size), np.uint8)
        cv2.circle(m, tuple(int(round(a * self.size * _ONE)) for a in (u, v)), int(round(r * self.size * _ONE)),
                   255, -1, cv2.LINE_AA, _SHIFT)
        return m.astype(np.float32) / 255.0

    def blur(self, m: np.ndarray, sigma: float) -> np.ndarray:
        s = sigma * self.size
        return cv2.GaussianBlur(m, (0, 0), s) if s > 0.3 else m


def _lung_outline(spec: PhantomSpec, side: str, n: int = 28) -> np.ndarray:
    """Closed outline (u, v) of one lung: apex arc, lateral wall, diaphragm dome, mediastinal border."""
    s = 1.0 if side == "left" else -1.0  # patient's left lung lies on the image right
    cp = spec.cp_left if side == "left" else spec.cp_right
    hw, top = spec.half_width, spec.lung_top
    dome = cp - spec.dome_rise
    med, a0, cap = 0.045, 0.15, 0.045
    ang = np.linspace(np.pi, 2 * np.pi, n // 2)
    apex = np.stack([(med + a0) / 2 + (a0 - med) / 2 * np.cos(ang), top + cap + cap * np.sin(ang)], 1)
    t = np.linspace(0, 1, n)[1:]
    lat = np.stack([a0 + (hw - a0) * np.sin(np.pi / 2 * t) ** 0.55, top + cap + t * (cp - top - cap)], 1)
    d = np.linspace(hw, med + 0.01, n)[1:]
    peak = 0.55 * hw
    yd = np.where(d > peak, dome + (cp - dome) * ((d - peak) / (hw - peak)) ** 2,
                  dome + 0.03 * ((peak - d) / (peak - med)) ** 2)
    dia = np.stack([d, yd], 1)
    pts = np.concatenate([apex, lat, dia])
    pts[:, 0] = spec.cx + s * pts[:, 0]
    return pts


def _hilum(spec: PhantomSpec, side: str) -> tuple[float, float]:
    s = 1.0 if side == "left" else -1.0
    return spec.cx + s * 0.09, spec.lung_top + 0.42 * ((spec.cp_left + spec.cp_right) / 2 - spec.lung_top)


def _zone_center(spec: PhantomSpec, where: str, rng: np.random.Generator) -> tuple[float, float]:
    side, zone = where.split("_")
    s = 1.0 if side == "left" else -1.0
    cp = spec.cp_left if side == "left" else spec.cp_right
    frac = {"upper": (0.15, 0.32), "mid": (0.42, 0.58), "lower": (0.66, 0.76)}[zone]
    v = spec.lung_top + rng.uniform(*frac) * (cp - spec.dome_rise - spec.lung_top)
    d = rng.uniform(0.45, 0.7) * spec.half_width if zone != "upper" else rng.uniform(0.35, 0.55) * spec.half_width
    return spec.cx + s * d, v


def _heart_mask(cv: _Canvas, spec: PhantomSpec) -> np.ndarray:
    """Heart ellipse (2/3 of it on the patient's left) plus the upper mediastinum with aortic knob."""
    width = spec.ctr * 2 * spec.half_width
    dome = min(spec.cp_left, spec.cp_right) - spec.dome_rise
    hh = 0.13 + 0.3 * (spec.ctr - 0.45)
    hc = (spec.cx + 0.12 * width, dome + 0.02 - hh * 0.45)
    m = np.zeros((cv.size, cv.size), np.uint8)
    cv2.ellipse(m, tuple(int(round(a * cv.size * _ONE)) for a in hc),
                tuple(int(round(a * cv.size * _ONE)) for a in (width / 2, hh)), 0, 0, 360, 255, -1,
                cv2.LINE_AA, _SHIFT)
    heart = m.astype(np.float32) / 255.0
    c, top = spec.cx, 0.0
    media = np.array([[c - 0.045, top], [c + 0.045, top], [c + 0.05, 0.25], [c + 0.085, 0.30],
                      [c + 0.075, 0.36], [c + 0.07, hc[1]], [c - 0.06, hc[1]], [c - 0.055, 0.30]])
    knob = cv.disc(*_knob(spec)) if KNOB_UNFOLDING[spec.age_level] else 0.0
    return np.maximum(np.maximum(heart, cv.poly(media)), knob)


def _knob(spec: PhantomSpec) -> tuple[float, float, float]:
    """(u, v, radius) of the aortic knob as it unfolds with age, on the patient's left of the upper mediastinum."""
    r = 0.035 + KNOB_UNFOLDING[spec.age_level]
    return spec.cx + 0.085 + r - 0.045, 0.30 - 0.3 * (r - 0.035), r


def _breasts(cv: _Canvas, spec: PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    """Breast soft-tissue shadows: a dome over each lower zone and costophrenic angle, faint at the top and
    densest at its sharp inferior (inframammary) edge, which lies over the upper abdomen below the lungs."""
    U, V = np.meshgrid(cv.px, cv.px)
    out = np.zeros_like(U)
    cp = (spec.cp_left + spec.cp_right) / 2
    amp, ru, rv = rng.uniform(0.45, 0.6), rng.uniform(0.15, 0.19), rng.uniform(0.13, 0.16)
    for s in (-1.0, 1.0):
        uc, vc = spec.cx + s * rng.uniform(0.23, 0.27), cp - rng.uniform(-0.01, 0.02)
        inside = cv.blur((((U - uc) / ru) ** 2 + ((V - vc) / rv) ** 2 < 1).astype(np.float32), 0.006)
        out += inside * np.clip((V - (vc - rv)) / (1.6 * rv), 0, 1) ** 1.5
    return amp * out


def _effusion_mask(spec: PhantomSpec, side: str, lung: np.ndarray, cv: _Canvas) -> np.ndarray:
    """Fluid in the costophrenic recess: everything in the lung below a meniscus rising to the wall."""
    s = 1.0 if side == "left" else -1.0
    cp = spec.cp_left if side == "left" else spec.cp_right
    lo, hi = EFFUSION_HEIGHT[spec.effusion_size]
    h = (lo + hi) / 2 * (cp - spec.lung_top)
    lateral = np.clip(s * (cv.px - spec.cx) / spec.half_width, 0, 1.2)
    level = cp - h - (0.3 * h + 0.01) * lateral ** 2
    below = (cv.px[:, None] > level[None, :]).astype(np.float32)
    return cv.blur(below, 0.012) * lung


def _text_layer(cv: _Canvas, items: Sequence[tuple[str, float, float, float]]) -> np.ndarray:
    m = np.zeros((cv.size, cv.size), np.uint8)
    for string, u, v, cap in items:
        scale = cap * cv.size / 22.0  # Hershey simplex capitals are ~22 px high at scale 1
        thick = max(1, int(round(scale * 2.2)))
        (w, h), base = cv2.getTextSize(string, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        x = int(round(max(0, min(u * cv.size, cv.size - w - 1))))
        y = int(round(min(v * cv.size + h, cv.size - base - 1)))
        cv2.putText(m, string, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    return m.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------- rendering

def render(spec: PhantomSpec, size: int = 128, seed: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one phantom: (float32 image in [0, 1], bool text mask or None when there is no text).

    `seed` overrides `spec.seed` for the fine detail (ribs, markings, noise); same inputs, same pixels."""
    if size < 16:
        raise ValueError(f"size {size} is too small to draw a chest; use 16 or more")
    base = spec.seed if seed is None else seed
    # separate streams, so adding a finding never changes the anatomy or the noise elsewhere
    rng, frng, nrng, drng = (np.random.default_rng([base, k]) for k in range(4))
    cv = _Canvas(size)
    c, hw, top = spec.cx, spec.half_width, spec.lung_top
    cp_mean = (spec.cp_left + spec.cp_right) / 2
    U, V = np.meshgrid(cv.px, cv.px)

    # body: soft tissue, thicker in the middle, shoulders and neck, denser abdomen below the domes
    bw = hw + rng.uniform(0.06, 0.09)
    body = np.array([[c - 0.07, 0], [c + 0.07, 0], [c + 0.08, top - 0.05], [c + bw + 0.1, top + 0.01],
                     [c + bw + 0.06, 0.45], [c + bw, 1.05], [c - bw, 1.05], [c - bw - 0.06, 0.45],
                     [c - bw - 0.1, top + 0.01], [c - 0.08, top - 0.05]])
    D = cv.blur(cv.poly(body), 0.01) * (0.45 + 0.5 * np.sqrt(np.clip(1 - ((U - c) / bw) ** 2, 0, 1)))
    D += 0.15 * np.clip((V - (cp_mean - spec.dome_rise)) / 0.1, 0, 1) * (D > 0.5)

    # lungs (with the pneumothorax region cut out of the aerated lung), hila, vascular markings
    lungs, aerated, markings = {}, np.zeros_like(D), np.zeros_like(D)
    pleural_lines = []
    for side in SIDES:
        outline = _lung_outline(spec, side)
        lungs[side] = cv.poly(outline)
        hx, hy = _hilum(spec, side)
        inner = lungs[side]
        if spec.pneumothorax == side:
            f = spec.pneumothorax_size
            base = np.array([c + (0.045 if side == "left" else -0.045), hy + 0.05])
            shrunk = base + (outline - base) * np.array([1 - f, 1 - 0.8 * f])
            inner = cv.poly(shrunk) * lungs[side]
            pleural_lines.append(shrunk[4:-len(shrunk) // 4])
        aerated += inner
        s = 1.0 if side == "left" else -1.0
        segs = []
        for _ in range(int(rng.integers(14, 20))):
            ang = rng.uniform(-1.35, 1.35) + (np.pi / 2) * (1 - s)  # fan away from the mediastinum
            r = np.cumsum(rng.uniform(0.02, 0.05, 5))
            a = ang + np.cumsum(rng.normal(0, 0.18, 5))
            segs.append(np.stack([hx + np.cos(a) * r, hy + np.sin(a) * r * 1.3], 1))
        markings += cv.lines(segs, 0.008) * inner
        D += 0.25 * np.exp(-(((U - hx) / 0.04) ** 2 + ((V - hy) / 0.07) ** 2)) * lungs[side]
    lung = np.clip(lungs["left"] + lungs["right"], 0, 1)
    aerated = np.clip(aerated, 0, 1)
    D -= (0.72 - 0.15 * (V - top)) * cv.blur(lung, 0.006)
    D -= 0.2 * (lung - aerated)  # pneumothorax: no lung tissue, darker
    D += 0.18 * cv.blur(markings, 0.004)
    if pleural_lines:
        D += 0.3 * cv.lines(pleural_lines, 0.006) * lung

    # mediastinum and heart, trachea, gastric bubble
    heart = cv.blur(_heart_mask(cv, spec), 0.006)
    D = D * (1 - heart) + 1.15 * heart
    trachea = [np.array([[c, 0.0], [c, 0.30]]), np.array([[c - 0.05, 0.38], [c, 0.30], [c + 0.06, 0.37]])]
    D -= 0.25 * cv.blur(cv.lines(trachea, 0.022), 0.006)
    D -= 0.35 * cv.blur(cv.disc(c + 0.16, spec.cp_left - spec.dome_rise + 0.06, 0.03), 0.01)

    # findings that fill lung with fluid-density tissue
    fluid = np.zeros_like(D)
    if spec.effusion != "none":
        for side in SIDES if spec.effusion == "bilateral" else (spec.effusion,):
            fluid = np.maximum(fluid, _effusion_mask(spec, side, lungs[side], cv))
    if spec.consolidation != "none":
        side = spec.consolidation.split("_")[0]
        u0, v0 = _zone_center(spec, spec.consolidation, frng)
        blob = np.zeros_like(D)
        for _ in range(5):
            blob = np.maximum(blob, cv.disc(u0 + frng.normal(0, 0.03), v0 + frng.normal(0, 0.03),
                                            frng.uniform(0.035, 0.065)))
        blob = cv.blur(blob, 0.018) * lungs[side] * frng.uniform(0.6, 0.8)
        fluid = np.maximum(fluid, blob * (1 - 0.5 * cv.blur(markings, 0.003)))
    if spec.nodule != "none":
        u0, v0 = _zone_center(spec, spec.nodule, frng)
        D += 0.45 * cv.blur(cv.disc(u0, v0, spec.nodule_radius), 0.004)
    D = D * (1 - fluid) + 1.05 * fluid

    # demographics: breast shadows (F), a calcified rim on the aortic knob (>65)
    if spec.sex == "F":
        D += _breasts(cv, spec, drng)
    if KNOB_CALCIFIED[spec.age_level]:
        ku, kv, kr = _knob(spec)
        m = np.zeros((size, size), np.uint8)
        cv2.ellipse(m, tuple(int(round(a * size * _ONE)) for a in (ku, kv)), (int(round(kr * size * _ONE)),) * 2,
                    0, 160, 340, 255, cv.width(0.028), cv2.LINE_AA, _SHIFT)
        D += 1.4 * m.astype(np.float32) / 255.0

    # bones: posterior and anterior ribs, clavicles, humeral heads, faint spine; fainter with age
    bone = BONE_DENSITY[spec.age_level]
    ribs, front = [], []
    for side in SIDES:
        s = 1.0 if side == "left" else -1.0
        cp = spec.cp_left if side == "left" else spec.cp_right
        step = (cp - top) / 9.0
        q = np.linspace(0, 1, 12)
        for k in range(10):
            y0 = top + 0.01 + k * step + rng.normal(0, 0.004)
            ribs.append(np.stack([c + s * (0.035 + q * (hw + 0.03)),
                                  y0 - 0.05 * np.sin(np.pi * q * 0.8) + 0.13 * q ** 2.5], 1))
            if k < 7:
                front.append(np.stack([c + s * (hw + 0.01 - q * (hw - 0.1)), y0 + 0.05 + 0.09 * q ** 1.5], 1))
        q = np.linspace(0, 1, 8)
        clav = np.stack([c + s * (0.03 + q * (hw + 0.08)), top + 0.05 - 0.07 * q + 0.02 * np.sin(np.pi * q)], 1)
        D += bone * 0.45 * cv.blur(cv.lines([clav], 0.026), 0.004)
        D += bone * 0.5 * cv.blur(cv.disc(c + s * (bw + 0.1), top + 0.02, 0.07), 0.01)
    over_lung = 0.3 + 0.7 * cv.blur(lung, 0.02)
    D += bone * (0.2 * cv.blur(cv.lines(ribs, 0.016), 0.003)
                 + 0.08 * cv.blur(cv.lines(front, 0.014), 0.004)) * over_lung
    D += bone * 0.15 * np.exp(-((U - c) / 0.03) ** 2) * (V > top)

    # support devices (metal)
    for dev in spec.devices:
        if dev == "et_tube":
            tube = [np.array([[c + 0.004, 0.0], [c + 0.002, 0.26]])]
            D += 0.35 * cv.lines(tube, 0.02) + 1.5 * cv.lines(tube, 0.006)
        elif dev == "central_line":
            path = np.array([[c - 0.14, 0.0], [c - 0.09, 0.12], [c - 0.045, 0.22], [c - 0.035, 0.30],
                             [c - 0.03, 0.36]])
            D += 1.4 * cv.lines([path], 0.007)
        elif dev == "pacemaker":
            gx, gy = c + hw * 0.72, top + 0.07
            D += 2.5 * cv.blur(cv.poly(np.array([[gx - 0.045, gy - 0.03], [gx + 0.045, gy - 0.035],
                                                 [gx + 0.05, gy + 0.03], [gx - 0.04, gy + 0.035]])), 0.004)
            lead = np.array([[gx - 0.03, gy], [c + 0.03, gy + 0.04], [c - 0.03, 0.32], [c - 0.025, 0.45],
                             [c + 0.04, cp_mean - spec.dome_rise - 0.04], [c + 0.1, cp_mean - spec.dome_rise - 0.02]])
            D += 1.5 * cv.lines([lead], 0.007)
        else:
            raise ValueError(f"unknown device {dev!r}; valid: {', '.join(DEVICES)}")

    # film: blur, tone curve, low-frequency unevenness, grain
    D = cv.blur(D, 0.004)
    img = 1.0 - np.exp(-spec.gain * np.clip(D, 0, None))
    low = cv2.resize(nrng.standard_normal((6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img + 0.025 * low + 0.018 * nrng.standard_normal((size, size), dtype=np.float32), 0, 1)
    img = img ** spec.gamma
    mask = None
    if spec.text:
        layer = _text_layer(cv, spec.text)
        img = np.maximum(img, layer * 0.97)
        mask = cv2.dilate((layer > 0).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return np.clip(img, 0, 1).astype(np.float32), mask
