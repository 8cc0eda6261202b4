"""Random but reproducible plans of phantom studies: anatomy, disc conditions, scanner.

A `StudyPlan` holds every number that `anatomy.paint` needs, drawn from one seed, so that
the same seed always gives the same study. Sizes and tissue values follow published
ranges (Zhou et al. 2000 lumbar vertebral dimensions; HU of fat -120..-80, muscle 35..60,
disc 60..110, cancellous bone 120..300, cortical bone 700..1400, CSF 0..15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from node.classes import DISC_LEVELS, VERTEBRAE, DiscClass

#: Discs per class in the IDAICS training set (normal, Schmorl's, bulge, protrusion).
PAPER_CLASS_MIX: dict[DiscClass, int] = {
    DiscClass.NORMAL: 104,
    DiscClass.SCHMORL: 57,
    DiscClass.BULGE: 128,
    DiscClass.PROTRUSION: 211,
}

KERNELS = {
    # name: (in-plane blur sigma mm, noise sd HU at reference dose)
    "SOFT": (0.85, 9.0),
    "STANDARD": (0.65, 14.0),
    "BONE": (0.45, 28.0),
}

# Nominal sizes per vertebra (body height, half width, half depth) in mm.
_BODY_MM = {
    "T8": (19.0, 15.0, 12.0),
    "T9": (20.0, 16.0, 12.5),
    "T10": (21.0, 17.0, 13.0),
    "T11": (22.0, 18.5, 13.5),
    "T12": (23.5, 20.0, 14.0),
    "L1": (25.0, 21.0, 15.0),
    "L2": (26.0, 22.0, 15.5),
    "L3": (26.5, 23.0, 16.0),
    "L4": (26.5, 24.0, 16.5),
    "L5": (25.5, 25.0, 16.5),
    "S1": (24.0, 25.0, 15.5),
}
# Nominal disc heights in mm, by the vertebra above.
_DISC_MM = {
    "T8": 5.0,
    "T9": 5.0,
    "T10": 5.5,
    "T11": 6.0,
    "T12": 7.0,
    "L1": 8.0,
    "L2": 9.0,
    "L3": 10.0,
    "L4": 11.0,
    "L5": 10.0,
}


@dataclass(frozen=True)
class Scanner:
    model: str
    kernel: str
    pixel_spacing: float
    slice_thickness: float
    slice_spacing: float
    slices: int
    noise_sd: float
    blur_mm: float
    kvp: float
    tube_current_ma: float
    rescale_intercept: float


@dataclass(frozen=True)
class Vertebra:
    name: str
    centre: np.ndarray  # LPS mm
    frame: np.ndarray  # columns: left (u), posterior (v), superior (w)
    height: float
    half_width: float
    half_depth: float
    canal_half_width: float
    canal_half_depth: float
    cancellous_hu: float
    cortical_hu: float
    osteophytes: tuple[tuple[float, float, float], ...] = ()  # (angle deg, +1 sup / -1 inf, mm)

    @property
    def is_sacrum(self) -> bool:
        return self.name == "S1"


@dataclass(frozen=True)
class Schmorl:
    into_upper: bool  # node pushed into the vertebra above (else below)
    offset_u: float  # mm, in the disc frame
    offset_v: float
    radius: float
    depth: float
    rim_mm: float
    rim_hu: float


@dataclass(frozen=True)
class Disc:
    level: str
    reported: bool  # one of the levels the node reports (T12-L1 ... L5-S1)
    upper: int  # index into StudyPlan.vertebrae
    lower: int
    classes: tuple[DiscClass, ...]
    bulge_mm: float = 0.0
    bulge_half_arc_deg: float = 0.0
    bulge_dir_deg: float = 90.0
    protrusion_mm: float = 0.0
    protrusion_half_width_deg: float = 0.0
    protrusion_dir_deg: float = 90.0
    schmorl: Schmorl | None = None
    nucleus_hu: float = 70.0
    annulus_hu: float = 95.0
    height_loss: bool = False
    vacuum: tuple[float, float, float, float] | None = None  # u, v, radius, half height (mm)

    @property
    def morphology(self) -> DiscClass:
        """The class of the disc body itself (normal, bulge or protrusion)."""
        for c in (DiscClass.PROTRUSION, DiscClass.BULGE):
            if c in self.classes:
                return c
        return DiscClass.NORMAL

    def extension_mm(self, theta_deg: np.ndarray) -> np.ndarray:
        """Planned extension beyond the vertebral edge at mid height, per angle."""
        theta = np.asarray(theta_deg, dtype=float)
        ext = np.zeros_like(theta)
        if self.bulge_mm > 0:
            d = np.abs((theta - self.bulge_dir_deg + 180.0) % 360.0 - 180.0)
            taper = 20.0
            f = np.clip((self.bulge_half_arc_deg + taper - d) / taper, 0.0, 1.0)
            ext = np.maximum(ext, self.bulge_mm * (0.5 - 0.5 * np.cos(np.pi * f)))
        if self.protrusion_mm > 0:
            d = np.abs((theta - self.protrusion_dir_deg + 180.0) % 360.0 - 180.0)
            w = self.protrusion_half_width_deg
            bump = np.where(d < w, np.cos(0.5 * np.pi * d / w) ** 2, 0.0)
            ext = np.maximum(ext, self.protrusion_mm * bump)
        return ext


@dataclass(frozen=True)
class Body:
    centre_x: float
    centre_y: float
    half_width: float
    half_depth: float
    fat_mm: float
    muscle_scale: float
    rotation_deg: float  # patient rotation about the cranio-caudal axis
    table_gap_mm: float
    fat_hu: float
    muscle_hu: float
    visceral_hu: float


@dataclass(frozen=True)
class Skeleton:
    """What surrounds the lumbar column in a real scan, and its variants.

    ``rib_bearing`` names the vertebrae with a pair of ribs: T8-T12 normally, T8-T11 with
    11 pairs, T8-L1 with 13 (a lumbar rib). Counted from the sacrum the levels are still
    right; counted from the lowest ribs they are one off, which the node must say.
    """

    rib_bearing: tuple[str, ...]
    rib_radius_mm: float
    rib_hu: tuple[float, float]  # cortex, marrow
    crest_offset_mm: float  # iliac crest above (+) or below the L4-L5 disc centre
    sacral_remnant_mm: float  # the rudimentary S1-S2 disc
    sacral_remnant_hu: float
    vessel_hu: float  # aorta and vena cava: 40 without contrast, up to 320 with
    sclerosis: tuple[str, ...] = ()  # vertebrae with sclerotic endplates
    bridging: tuple[str, ...] = ()  # disc levels bridged by an osteophyte

    @property
    def rib_pairs(self) -> int:
        return 12 + len(self.rib_bearing) - 5


@dataclass(frozen=True)
class StudyPlan:
    seed: int
    index: int
    scanner: Scanner
    body: Body
    vertebrae: tuple[Vertebra, ...]
    discs: tuple[Disc, ...]
    first_position: tuple[float, float, float]
    patient_sex: str
    patient_age: int
    study_date: str
    extras: dict = field(default_factory=dict)
    skeleton: Skeleton | None = None


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _draw_classes(
    rng: np.random.Generator, mix: dict[DiscClass, float], co_rate: float
) -> tuple[DiscClass, ...]:
    names = list(mix)
    p = np.array([mix[c] for c in names], dtype=float)
    primary = names[int(rng.choice(len(names), p=p / p.sum()))]
    if primary in (DiscClass.BULGE, DiscClass.PROTRUSION) and rng.random() < co_rate:
        return (primary, DiscClass.SCHMORL)
    return (primary,)


def plan_study(
    seed: int,
    index: int,
    *,
    class_mix: dict[DiscClass, float] | None = None,
    co_occurrence: float = 0.15,
    lookalike_rate: float = 0.2,
    slices: int | None = None,
    surroundings: bool = True,
) -> StudyPlan:
    """Draw one study from ``(seed, index)``; ``slices`` forces the slice count.

    ``surroundings=False`` leaves out what surrounds the column (ribs, pelvis, sacral
    segments, contrast, bone variants, 5 mm slices, cut fields of view; see `Skeleton`): a
    plain lumbar study, for tests of what comes after the disc finder.
    """
    rng = np.random.default_rng([seed, index])
    mix = {c: float(n) for c, n in (class_mix or PAPER_CLASS_MIX).items()}

    # Scanner and reconstruction.
    kernel = str(rng.choice(list(KERNELS), p=[0.3, 0.45, 0.25]))
    blur, noise = KERNELS[kernel]
    dose = float(rng.uniform(0.6, 1.6))
    spacing_choices = [0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
    slice_spacing = float(
        rng.choice(spacing_choices, p=[0.15, 0.15, 0.25, 0.15, 0.1, 0.1, 0.05, 0.05])
    )
    thickness = slice_spacing if rng.random() < 0.8 else min(3.0, slice_spacing * 1.25)
    coverage = float(rng.uniform(205.0, 290.0))
    n_slices = slices or int(np.clip(round(coverage / slice_spacing), 150, 500))
    scanner = Scanner(
        model=str(rng.choice(["SPINE-PHANTOM-64", "SPINE-PHANTOM-128", "SPINE-PHANTOM-DE"])),
        kernel=kernel,
        pixel_spacing=round(float(rng.uniform(0.6, 0.9)), 4),
        slice_thickness=float(thickness),
        slice_spacing=slice_spacing,
        slices=n_slices,
        noise_sd=noise / math.sqrt(dose) * math.sqrt(1.0 / max(thickness, 0.625)),
        blur_mm=blur,
        kvp=float(rng.choice([100.0, 120.0, 140.0], p=[0.2, 0.65, 0.15])),
        tube_current_ma=round(200.0 * dose, 1),
        rescale_intercept=float(rng.choice([-1024.0, -1000.0], p=[0.8, 0.2])),
    )

    fov = 512 * scanner.pixel_spacing
    body = Body(
        centre_x=float(rng.uniform(-12, 12)),
        centre_y=float(rng.uniform(-20, 5)),
        half_width=float(min(rng.uniform(145, 195), 0.46 * fov)),
        half_depth=float(min(rng.uniform(105, 140), 0.36 * fov)),
        fat_mm=float(rng.uniform(8, 35)),
        muscle_scale=float(rng.uniform(0.8, 1.2)),
        rotation_deg=float(rng.normal(0, 3.0)),
        table_gap_mm=float(rng.uniform(0, 4)),
        fat_hu=float(rng.uniform(-115, -85)),
        muscle_hu=float(rng.uniform(40, 58)),
        visceral_hu=float(rng.uniform(25, 45)),
    )

    # Spine: sagittal angles of each vertebra's axis (lordosis), scoliotic tilt, sizes.
    scale = float(rng.uniform(0.88, 1.12))
    lordosis = float(rng.uniform(30, 65))
    phi_l1 = -lordosis * float(rng.uniform(0.2, 0.35))
    weights = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
    phis = {
        name: phi_l1 - 1.5 * (VERTEBRAE.index("L1") - i) for i, name in enumerate(VERTEBRAE[:5])
    }
    phis["L1"] = phi_l1
    acc = phi_l1
    for name, w in zip(VERTEBRAE[6:], weights):
        acc += lordosis * w
        phis[name] = acc
    scol_amp = float(rng.normal(0, 4.0))
    scol_phase = float(rng.uniform(0, 2 * math.pi))

    heights = {n: _BODY_MM[n][0] * scale * float(rng.uniform(0.96, 1.04)) for n in VERTEBRAE}
    height_loss = {n: bool(rng.random() < lookalike_rate * 0.6) for n in VERTEBRAE[:-1]}
    disc_h = {
        n: _DISC_MM[n]
        * scale
        * float(rng.uniform(0.85, 1.15))
        * (float(rng.uniform(0.45, 0.65)) if height_loss[n] else 1.0)
        for n in VERTEBRAE[:-1]
    }
    frames = {}
    for i, n in enumerate(VERTEBRAE):
        psi = math.radians(scol_amp * math.sin(scol_phase + 0.6 * i))
        frames[n] = _rot_y(psi) @ _rot_x(math.radians(phis[n]))

    # Chain the vertebrae from L3 (placed near the body's posterior third) both ways.
    centres: dict[str, np.ndarray] = {}
    l3 = np.array([body.centre_x + rng.uniform(-5, 5), body.centre_y + body.half_depth * 0.25, 0.0])
    centres["L3"] = l3
    i3 = VERTEBRAE.index("L3")
    for i in range(i3 + 1, len(VERTEBRAE)):
        up, lo = VERTEBRAE[i - 1], VERTEBRAE[i]
        e_up, e_lo = frames[up][:, 2], frames[lo][:, 2]
        d_disc = (e_up + e_lo) / np.linalg.norm(e_up + e_lo)
        centres[lo] = (
            centres[up] - e_up * heights[up] / 2 - d_disc * disc_h[up] - e_lo * heights[lo] / 2
        )
    for i in range(i3 - 1, -1, -1):
        up, lo = VERTEBRAE[i], VERTEBRAE[i + 1]
        e_up, e_lo = frames[up][:, 2], frames[lo][:, 2]
        d_disc = (e_up + e_lo) / np.linalg.norm(e_up + e_lo)
        centres[up] = (
            centres[lo] + e_lo * heights[lo] / 2 + d_disc * disc_h[up] + e_up * heights[up] / 2
        )

    # Patient rotation about the body's centre, applied to the whole spine.
    rz = _rot_z(math.radians(body.rotation_deg))
    pivot = np.array([body.centre_x, body.centre_y, 0.0])

    vertebrae = []
    for n in VERTEBRAE:
        _, a, b = _BODY_MM[n]
        osteo: list[tuple[float, float, float]] = []
        if n != "S1" and rng.random() < lookalike_rate:
            for _ in range(int(rng.integers(1, 3))):
                osteo.append(
                    (
                        float(rng.choice([-90.0, -50.0, -130.0, 0.0, 180.0]) + rng.normal(0, 10)),
                        float(rng.choice([-1.0, 1.0])),
                        float(rng.uniform(2.0, 5.0)),
                    )
                )
        vertebrae.append(
            Vertebra(
                name=n,
                centre=rz @ (centres[n] - pivot) + pivot,
                frame=rz @ frames[n],
                height=heights[n],
                half_width=a
                * scale
                * float(rng.uniform(0.96, 1.04))
                * (1.12 if n == "S1" else 1.0),
                half_depth=b * scale * float(rng.uniform(0.96, 1.04)),
                canal_half_width=float(rng.uniform(9.5, 12.5))
                * (0.85 if n.startswith("T") else 1.0),
                canal_half_depth=float(rng.uniform(6.5, 9.0)),
                cancellous_hu=float(rng.uniform(130, 290)),
                cortical_hu=float(rng.uniform(750, 1250)),
                osteophytes=tuple(osteo),
            )
        )

    discs = []
    for i in range(len(VERTEBRAE) - 1):
        level = f"{VERTEBRAE[i]}-{VERTEBRAE[i + 1]}"
        reported = level in DISC_LEVELS
        classes = _draw_classes(rng, mix, co_occurrence) if reported else (DiscClass.NORMAL,)
        kw: dict = {}
        if DiscClass.BULGE in classes:
            circumferential = rng.random() < 0.35
            kw.update(
                bulge_mm=float(rng.uniform(1.8, 4.0)),
                bulge_half_arc_deg=180.0 if circumferential else float(rng.uniform(75, 150)),
                bulge_dir_deg=90.0 + float(rng.normal(0, 15)),
            )
        if DiscClass.PROTRUSION in classes:
            side = float(rng.choice([0.0, -1.0, 1.0], p=[0.4, 0.3, 0.3]))
            kw.update(
                protrusion_mm=float(rng.uniform(3.0, 7.0)),
                protrusion_half_width_deg=float(rng.uniform(18, 32)),
                protrusion_dir_deg=90.0 + side * float(rng.uniform(20, 40)),
            )
        if DiscClass.SCHMORL in classes:
            up_v = vertebrae[i]
            kw["schmorl"] = Schmorl(
                into_upper=bool(rng.random() < 0.5),
                offset_u=float(rng.uniform(-0.45, 0.45) * up_v.half_width),
                offset_v=float(rng.uniform(-0.45, 0.35) * up_v.half_depth),
                radius=float(rng.uniform(2.8, 5.5)),
                depth=float(rng.uniform(3.5, 7.0)),
                rim_mm=float(rng.uniform(1.0, 2.0)),
                rim_hu=float(rng.uniform(600, 950)),
            )
        vac = None
        if rng.random() < lookalike_rate * 0.5:
            vac = (
                float(rng.uniform(-6, 6)),
                float(rng.uniform(-6, 4)),
                float(rng.uniform(3, 7)),
                float(rng.uniform(0.7, 1.5)),
            )
        discs.append(
            Disc(
                level=level,
                reported=reported,
                upper=i,
                lower=i + 1,
                classes=classes,
                nucleus_hu=float(rng.uniform(55, 80)),
                annulus_hu=float(rng.uniform(82, 110)),
                height_loss=height_loss[VERTEBRAE[i]],
                vacuum=vac,
                **kw,
            )
        )

    # Scan range: as a lumbar spine protocol sets it, from below the S1 body upwards, so the
    # sacrum is always seen; how far up it reaches (T12-L1 or beyond) varies with coverage.
    length = (scanner.slices - 1) * scanner.slice_spacing
    s1 = vertebrae[-1]
    s1_bottom = s1.centre[2] - 0.5 * (
        s1.height * abs(s1.frame[2, 2]) + 2 * s1.half_depth * abs(s1.frame[2, 1])
    )
    z_bottom = s1_bottom - 8.0 + float(rng.uniform(-15, 15)) * 0.5
    half_fov = fov / 2
    first = (
        round(-half_fov + float(rng.uniform(-3, 3)), 3),
        round(-half_fov + 20.0 + float(rng.uniform(-3, 3)), 3),
        round(z_bottom + length, 3),
    )
    skel = None
    if surroundings:  # a stream of its own: the draws above stay the same either way
        skel, scanner, vertebrae_t, first = _draw_skeleton(
            np.random.default_rng([seed, index, 21]),
            scanner,
            tuple(vertebrae),
            first,
            forced_slices=slices is not None,
            coverage=coverage,
        )
        vertebrae = list(vertebrae_t)
    day = int(rng.integers(0, 3650))
    date = np.datetime64("2015-01-01") + np.timedelta64(day, "D")
    return StudyPlan(
        seed=seed,
        index=index,
        scanner=scanner,
        body=body,
        vertebrae=tuple(vertebrae),
        discs=tuple(discs),
        first_position=first,
        patient_sex=str(rng.choice(["F", "M"])),
        patient_age=int(rng.integers(25, 85)),
        study_date=str(date).replace("-", ""),
        extras={"lordosis_deg": lordosis, "scoliosis_deg": scol_amp, "dose_factor": dose},
        skeleton=skel,
    )


#: Rates of the variants (drawn from a stream of their own, so that a seed keeps the
#: spine, discs and scanner it had before they were added).
RIB_VARIANT_RATE = 0.1  # each of 11 and 13 pairs
THICK_SLICE_RATE = 0.06  # 5 mm reconstructions
SACRUM_CUT_RATE = 0.1  # the field of view stops above the sacrum
OSTEOPOROSIS_RATE = 0.2
CONTRAST_RATE = 0.4


def _draw_skeleton(
    rng: np.random.Generator,
    scanner: Scanner,
    vertebrae: tuple[Vertebra, ...],
    first: tuple[float, float, float],
    *,
    forced_slices: bool,
    coverage: float,
) -> tuple[Skeleton, Scanner, tuple[Vertebra, ...], tuple[float, float, float]]:
    """Ribs, pelvis, sacral segments, vessels and bone quality; 5 mm slices (where the slice
    count is not forced) and fields of view that cut the sacrum."""
    u = rng.random()
    last = "T11" if u < RIB_VARIANT_RATE else "L1" if u < 2 * RIB_VARIANT_RATE else "T12"
    names = [v.name for v in vertebrae]
    rib_bearing = tuple(names[: names.index(last) + 1])
    osteoporotic = rng.random() < OSTEOPOROSIS_RATE
    verts = tuple(
        replace(v, cancellous_hu=float(rng.uniform(60, 120)))
        if osteoporotic and not v.is_sacrum
        else v
        for v in vertebrae
    )
    lumbar_discs = [f"{a}-{b}" for a, b in zip(names[4:-1], names[5:])]
    skel = Skeleton(
        rib_bearing=rib_bearing,
        rib_radius_mm=float(rng.uniform(3.5, 5.0)),
        rib_hu=(float(rng.uniform(550, 900)), float(rng.uniform(150, 300))),
        crest_offset_mm=float(rng.uniform(-12, 12)),
        sacral_remnant_mm=float(rng.uniform(1.5, 3.5)),
        sacral_remnant_hu=float(rng.uniform(90, 260)),
        vessel_hu=float(rng.uniform(150, 320)) if rng.random() < CONTRAST_RATE else 42.0,
        sclerosis=tuple(v.name for v in verts[4:-1] if rng.random() < 0.08),
        bridging=tuple(lv for lv in lumbar_discs if rng.random() < 0.04),
    )
    thick, cut = rng.random() < THICK_SLICE_RATE, rng.random() < SACRUM_CUT_RATE
    if thick and not forced_slices:
        z_bottom = first[2] - (scanner.slices - 1) * scanner.slice_spacing
        n = int(np.clip(round(coverage / 5.0), 40, 500))
        scanner = replace(
            scanner,
            slice_spacing=5.0,
            slice_thickness=5.0,
            slices=n,
            noise_sd=scanner.noise_sd * math.sqrt(max(scanner.slice_thickness, 0.625) / 5.0),
        )
        first = (first[0], first[1], round(z_bottom + (n - 1) * 5.0, 3))
    if cut:
        # the scan starts in L5 or L4: no sacrum in view, the levels must come from the ribs
        lift = float(rng.uniform(45, 75))
        first = (first[0], first[1], round(first[2] + lift, 3))
    return skel, scanner, verts, first
