"""The four disc classes of the IDAICS paper and the spinal levels the node names.

Every other module takes class names and level names from here, so that a dataset, a
model card and a report always agree on the order of the class ids.
"""

from __future__ import annotations

from enum import Enum


class DiscClass(str, Enum):
    """A disc condition as defined in the IDAICS paper (Front. Radiol. 2025)."""

    NORMAL = "normal"
    """Between two vertebrae and not beyond their edges."""
    SCHMORL = "schmorl"
    """Nucleus pulposus pushed through the endplate into the vertebral body."""
    BULGE = "bulge"
    """Extension beyond the vertebral edge over more than 25% of the circumference."""
    PROTRUSION = "protrusion"
    """Focal extension over less than 25% of the circumference, base wider than dome."""

    @property
    def class_id(self) -> int:
        return CLASS_NAMES.index(self.value)

    @property
    def display(self) -> str:
        return DISPLAY_NAMES[self]


#: Model class ids are the positions in this tuple.
CLASS_NAMES: tuple[str, ...] = tuple(c.value for c in DiscClass)

DISPLAY_NAMES: dict[DiscClass, str] = {
    DiscClass.NORMAL: "normal disc",
    DiscClass.SCHMORL: "Schmorl's node",
    DiscClass.BULGE: "disc bulge",
    DiscClass.PROTRUSION: "disc protrusion",
}

#: The order used when one class must stand for an image that shows several
#: (the most specific finding first).
SEVERITY: tuple[DiscClass, ...] = (
    DiscClass.PROTRUSION,
    DiscClass.BULGE,
    DiscClass.SCHMORL,
    DiscClass.NORMAL,
)

#: Display colours (RGB) per class, shared by previews, key images and SEG.
CLASS_COLOURS: dict[DiscClass, tuple[int, int, int]] = {
    DiscClass.NORMAL: (60, 200, 90),
    DiscClass.SCHMORL: (240, 200, 40),
    DiscClass.BULGE: (250, 130, 30),
    DiscClass.PROTRUSION: (230, 40, 60),
}

#: The plain disc of a level whose finding is shown on its own (a neutral blue).
DISC_COLOUR: tuple[int, int, int] = (110, 160, 230)

#: Vertebrae from cranial to caudal, as the phantom and the level naming use them.
VERTEBRAE: tuple[str, ...] = ("T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")

#: The disc levels the node reports, cranial to caudal.
DISC_LEVELS: tuple[str, ...] = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


def parse_class(name: str) -> DiscClass:
    """Return the class for a canonical name, with a clear error otherwise."""
    try:
        return DiscClass(name)
    except ValueError:
        raise ValueError(
            f"unknown disc class {name!r}; expected one of {', '.join(CLASS_NAMES)}"
        ) from None


def most_severe(classes: list[DiscClass] | set[DiscClass]) -> DiscClass:
    """The class that stands for a set of classes (see `SEVERITY`)."""
    for c in SEVERITY:
        if c in classes:
            return c
    return DiscClass.NORMAL
