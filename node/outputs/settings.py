"""Which DICOM objects the node produces, and how they name themselves."""

from __future__ import annotations

from dataclasses import dataclass, field

from node import __version__

#: Every object the node can make: the SEG, the planar SR (TID 1410, what OHIF and most
#: viewers show), key images, and the volumetric SR (TID 1411 groups referencing the SEG,
#: for 3D Slicer), which is made only where asked for.
OBJECTS = ("seg", "sr", "key_images", "sr_volumetric")
DEFAULT_OBJECTS = ("seg", "sr", "key_images")


@dataclass(frozen=True)
class OutputSettings:
    #: Which objects to produce, from `OBJECTS`. A study with no disc gets no SEG.
    objects: tuple[str, ...] = DEFAULT_OBJECTS
    #: Series numbers are stable, so that a PACS shows the node's series in the same place.
    seg_series_number: int = 9801
    sr_series_number: int = 9802
    key_images_series_number: int = 9803
    volumetric_sr_series_number: int = 9804
    manufacturer: str = "IDAICS"
    model_name: str = "IDAICS node"
    software_version: str = field(default=__version__)
    device_serial_number: str = "0"
    institution_name: str | None = None

    def __post_init__(self) -> None:
        unknown = [o for o in self.objects if o not in OBJECTS]
        if unknown:
            raise ValueError(
                f"unknown output object(s) {', '.join(unknown)}; choose from {', '.join(OBJECTS)}"
            )
        if "sr_volumetric" in self.objects and "seg" not in self.objects:
            raise ValueError(
                "the volumetric SR (sr_volumetric) refers to the SEG's segments: add seg to the objects"
            )
