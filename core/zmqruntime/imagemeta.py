"""What an image result means physically: axes, pixel size, units, channels, kind.

A pipeline states it at the call (``ctx.emit(name, array, axes="cyx", scale={"y": 0.65,
"x": 0.65}, channels=["DAPI", "GFP"])``); it is checked there, so a mistake raises
``ValueError`` in the pipeline and never reaches a file. It travels as a plain dict (the
``meta`` of a result's index entry and of ``result``/``preview`` events, docs/protocol.md
§4.2), and the exporters and viewers read it back with :meth:`ImageMeta.from_dict`.

The vocabulary is OME-NGFF's: axis names over ``tczyx``, units as UDUNITS-2 names
(``micrometer``, ``second``), channel colours as ``RRGGBB`` hex strings (omero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: every axis an image may have, in OME-NGFF's order (time, channel, space)
AXES = "tczyx"
SPACE_AXES = "zyx"
#: what a result holds: intensities, or integer labels of segmented objects
KINDS = ("image", "labels")
DEFAULT_SPACE_UNIT = "micrometer"
DEFAULT_TIME_UNIT = "second"

#: OME-NGFF 0.4's space units (UDUNITS-2 names)
SPACE_UNITS = frozenset(
    "angstrom attometer centimeter decimeter exameter femtometer foot gigameter hectometer "
    "inch kilometer megameter meter micrometer mile millimeter nanometer parsec petameter "
    "picometer terameter yard yoctometer yottameter zeptometer zettameter".split()
)
#: OME-NGFF 0.4's time units
TIME_UNITS = frozenset(
    "attosecond centisecond day decisecond exasecond femtosecond gigasecond hectosecond hour "
    "kilosecond megasecond microsecond millisecond minute nanosecond petasecond picosecond "
    "second terasecond yoctosecond yottasecond zeptosecond zettasecond".split()
)
#: the short forms people type, and the names they stand for
UNIT_ALIASES = {
    "um": "micrometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "nm": "nanometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "Å": "angstrom",
    "s": "second",
    "sec": "second",
    "ms": "millisecond",
    "us": "microsecond",
    "µs": "microsecond",
    "min": "minute",
    "h": "hour",
}
#: the symbols OME-XML (OME-TIFF) writes for the units above
OME_XML_UNITS = {
    "angstrom": "Å",
    "nanometer": "nm",
    "micrometer": "µm",
    "millimeter": "mm",
    "centimeter": "cm",
    "meter": "m",
    "picometer": "pm",
    "second": "s",
    "millisecond": "ms",
    "microsecond": "µs",
    "nanosecond": "ns",
    "minute": "min",
    "hour": "h",
}
#: colour names accepted for channels, as the RRGGBB they stand for
COLOR_NAMES = {
    "red": "FF0000",
    "green": "00FF00",
    "blue": "0000FF",
    "cyan": "00FFFF",
    "magenta": "FF00FF",
    "yellow": "FFFF00",
    "gray": "FFFFFF",
    "grey": "FFFFFF",
    "white": "FFFFFF",
}


@dataclass(frozen=True)
class Channel:
    """One channel: its name and display colour (``RRGGBB``, or None: the viewer picks)."""

    name: str
    color: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return (
            {"name": self.name} if self.color is None else {"name": self.name, "color": self.color}
        )


@dataclass(frozen=True)
class ImageMeta:
    """Validated image metadata of one array (see the module docstring).

    ``scale`` and ``units`` map axis names to a physical size per pixel and its unit;
    only axes whose size was stated are in ``scale`` (``calibrated`` says whether y or x
    is). ``units`` holds a unit for every space and time axis of ``axes``. An array without
    a ``t`` axis may state ``scale["t"]``: the time between consecutive results of its name,
    the frame interval of the time series an export stacks them into (unit: second unless
    ``units["t"]`` says otherwise).
    """

    axes: str
    scale: Mapping[str, float]
    units: Mapping[str, str]
    channels: tuple[Channel, ...] | None = None
    kind: str | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        dtype: Any = None,
        *,
        axes: str | None = None,
        scale: Mapping[str, float] | Sequence[float] | None = None,
        units: str | Mapping[str, str] | None = None,
        channels: Sequence[str | Mapping[str, Any]] | None = None,
        kind: str | None = None,
    ) -> ImageMeta:
        """The metadata of an array of ``shape``; ValueError (saying why) if it does not fit."""
        ndim = len(shape)
        if axes is None:
            axes = default_axes(ndim)
        axes = _check_axes(axes, ndim)
        scale_map = _check_scale(scale, axes)
        unit_map = _check_units(units, axes)
        if "t" not in axes:  # a frame interval, or nothing about time at all
            if "t" in scale_map:
                unit_map.setdefault("t", DEFAULT_TIME_UNIT)
            elif "t" in unit_map:
                raise ValueError("units name 't', but no frame interval (scale 't') is given")
        channel_list = _check_channels(channels, axes, shape)
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
            if kind == "labels" and dtype is not None and _dtype_kind(dtype) not in "iub":
                raise ValueError(f"labels must be an integer array, got dtype {dtype}")
        return cls(axes, scale_map, unit_map, channel_list, kind)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Sequence[int] | None = None) -> ImageMeta:
        """Read back :meth:`to_dict`'s output (checked again: it may come from a file)."""
        axes = data.get("axes")
        if shape is None:
            if not isinstance(axes, str):
                raise ValueError("image metadata without axes")
            shape = [0] * len(axes)  # channel counts are not checked without a shape
        return cls.build(
            shape,
            axes=axes,
            scale=data.get("scale"),
            units=data.get("units"),
            channels=data.get("channels"),
            kind=data.get("kind"),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain, msgpack- and JSON-able dict; keys with nothing to say are left out."""
        out: dict[str, Any] = {"axes": self.axes}
        if self.scale:
            out["scale"] = dict(self.scale)
        if self.units:
            out["units"] = dict(self.units)
        if self.channels is not None:
            out["channels"] = [c.to_dict() for c in self.channels]
        if self.kind is not None:
            out["kind"] = self.kind
        return out

    # ------------------------------------------------------------------ reading
    @property
    def calibrated(self) -> bool:
        """Whether the physical pixel size in the image plane is known."""
        return "x" in self.scale or "y" in self.scale

    def scale_of(self, axis: str) -> float:
        """The physical size of one step along ``axis`` (1.0 where it was not stated)."""
        return float(self.scale.get(axis, 1.0))

    def unit_of(self, axis: str) -> str | None:
        return self.units.get(axis)

    def channel_names(self, n: int | None = None) -> list[str]:
        """One name per channel: the stated ones, else ``c0``, ``c1``..."""
        if self.channels is not None:
            return [c.name for c in self.channels]
        return [f"c{i}" for i in range(n or 0)]

    def canonical(self) -> tuple[str, tuple[int, ...]]:
        """``axes`` in OME order (a subsequence of ``tczyx``) and the transpose to reach it."""
        order = tuple(sorted(range(len(self.axes)), key=lambda i: AXES.index(self.axes[i])))
        return "".join(self.axes[i] for i in order), order


def default_axes(ndim: int) -> str:
    """The axes of an array whose axes were not stated: the last ``ndim`` of ``tczyx``
    (2-D: ``yx``, 3-D: ``zyx``, 4-D: ``czyx``, 5-D: ``tczyx``)."""
    if not 2 <= ndim <= len(AXES):
        raise ValueError(
            f"an image has 2 to {len(AXES)} dimensions; this array has {ndim}: "
            "state its axes, or emit it without image metadata"
        )
    return AXES[-ndim:]


def meta_for(value: Any, **keywords: Any) -> dict[str, Any] | None:
    """The checked ``meta`` dict for an emit/preview call, or None when none was given."""
    if all(v is None for v in keywords.values()):
        return None
    shape = getattr(value, "shape", None)
    if shape is None or not hasattr(value, "dtype"):
        raise ValueError(
            "image metadata (axes, scale, units, channels, kind) applies to numpy arrays, "
            f"not to {type(value).__name__}"
        )
    return ImageMeta.build(shape, value.dtype, **keywords).to_dict()


# ---------------------------------------------------------------------- checks
def _check_axes(axes: Any, ndim: int) -> str:
    if not isinstance(axes, str):
        raise ValueError(f"axes must be a str over {AXES!r}, e.g. 'cyx', got {type(axes).__name__}")
    axes = axes.lower()
    bad = sorted(set(axes) - set(AXES))
    if bad:
        raise ValueError(f"axes {axes!r}: {''.join(bad)!r} is not one of {AXES!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} name an axis twice")
    if len(axes) != ndim:
        raise ValueError(f"axes {axes!r} name {len(axes)} axes, but the array has {ndim}")
    if not any(a in SPACE_AXES for a in axes):
        raise ValueError(f"axes {axes!r} have no space axis (z, y or x)")
    return axes


def _positive(value: Any, axis: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"scale of axis {axis!r} must be a number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"scale of axis {axis!r} must be positive and finite, got {value!r}")
    return number


def _check_scale(scale: Any, axes: str) -> dict[str, float]:
    if scale is None:
        return {}
    if isinstance(scale, Mapping):
        out = {}
        for axis, value in scale.items():
            # "t" without a t axis: the interval between this name's consecutive results
            if not isinstance(axis, str) or axis.lower() not in axes + "t":
                raise ValueError(f"scale names axis {axis!r}, which is not in axes {axes!r}")
            out[axis.lower()] = _positive(value, axis)
    elif isinstance(scale, (Sequence, np.ndarray)) and not isinstance(scale, (str, bytes)):
        if len(scale) != len(axes):
            raise ValueError(
                f"scale has {len(scale)} values but axes {axes!r} have {len(axes)}: "
                "give one per axis, or a dict such as {'y': 0.65, 'x': 0.65}"
            )
        out = {axis: _positive(v, axis) for axis, v in zip(axes, scale)}
    else:
        raise ValueError(f"scale must be a dict or a tuple, got {type(scale).__name__}")
    if out.get("c", 1.0) != 1.0:
        raise ValueError("the channel axis has no physical size: its scale must be 1")
    out.pop("c", None)
    return {a: out[a] for a in axes + ("" if "t" in axes else "t") if a in out}


def _unit_name(unit: Any, axis: str) -> str:
    if not isinstance(unit, str):
        raise ValueError(f"unit of axis {axis!r} must be a str, got {type(unit).__name__}")
    name = UNIT_ALIASES.get(unit, UNIT_ALIASES.get(unit.lower(), unit.lower()))
    allowed = TIME_UNITS if axis == "t" else SPACE_UNITS
    if name not in allowed:
        what = "time" if axis == "t" else "space"
        raise ValueError(
            f"unit {unit!r} of axis {axis!r} is not an OME-NGFF {what} unit "
            f"(e.g. {'second' if axis == 't' else 'micrometer'})"
        )
    return name


def _check_units(units: Any, axes: str) -> dict[str, str]:
    out = {a: DEFAULT_TIME_UNIT if a == "t" else DEFAULT_SPACE_UNIT for a in axes if a != "c"}
    if units is None:
        return out
    if isinstance(units, str):  # one unit for every space axis
        for axis in axes:
            if axis in SPACE_AXES:
                out[axis] = _unit_name(units, axis)
        return out
    if not isinstance(units, Mapping):
        raise ValueError(f"units must be a str or a dict, got {type(units).__name__}")
    for axis, unit in units.items():
        if not isinstance(axis, str) or axis.lower() not in (*out, "t"):
            raise ValueError(f"units name axis {axis!r}, which has no unit in axes {axes!r}")
        out[axis.lower()] = _unit_name(unit, axis.lower())
    return out


def _color(value: Any, channel: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = COLOR_NAMES.get(value.lower(), value.lstrip("#"))
        if len(text) == 6 and all(c in "0123456789abcdefABCDEF" for c in text):
            return text.upper()
    raise ValueError(
        f"colour of channel {channel} must be 'RRGGBB' hex or one of "
        f"{', '.join(sorted(COLOR_NAMES))}, got {value!r}"
    )


def _check_channels(channels: Any, axes: str, shape: Sequence[int]) -> tuple[Channel, ...] | None:
    if channels is None:
        return None
    if "c" not in axes:
        raise ValueError(f"channels are named but axes {axes!r} have no channel axis 'c'")
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise ValueError("channels must be a list of names or of {'name', 'color'} dicts")
    n = shape[axes.index("c")]
    if n and len(channels) != n:
        raise ValueError(f"{len(channels)} channel names for {n} channels (axis 'c')")
    out = []
    for i, item in enumerate(channels):
        if isinstance(item, str):
            out.append(Channel(item))
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            extra = set(item) - {"name", "color"}
            if extra:
                raise ValueError(f"channel {i} has unknown keys {sorted(extra)}")
            out.append(Channel(item["name"], _color(item.get("color"), i)))
        else:
            raise ValueError(f"channel {i} must be a name or a {{'name', 'color'}} dict")
    return tuple(out)


def _dtype_kind(dtype: Any) -> str:
    return np.dtype(dtype).kind
