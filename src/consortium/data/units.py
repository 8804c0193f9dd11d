"""Units a harmonisation converts between: a small table of linear conversions,
``to = from × factor + offset``.

Exact by definition: the international pound (0.45359237 kg), the inch (2.54 cm), the foot,
and the temperature scales. Between molar and mass concentrations (mmol/L ↔ mg/dL) the factor
depends on the substance: :data:`SUBSTANCES` holds the conventional clinical factors (about
a tenth of the molar mass in g/mol). Anything else takes an explicit ``factor``/``offset``
in ``harmonize.toml``; a units library (pint) would add a dependency for these few lines and
still need the substances' factors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from consortium.errors import ConfigError

__all__ = ["SUBSTANCES", "UNITS", "Conversion", "canonical_unit", "conversion", "known_conversions"]

# unit -> (dimension, scale, offset): value in the dimension's base unit = value × scale + offset
UNITS: dict[str, tuple[str, float, float]] = {
    "kg": ("mass", 1.0, 0.0),
    "g": ("mass", 1e-3, 0.0),
    "lb": ("mass", 0.45359237, 0.0),  # the international pound, exact
    "m": ("length", 1.0, 0.0),
    "cm": ("length", 1e-2, 0.0),
    "mm": ("length", 1e-3, 0.0),
    "in": ("length", 0.0254, 0.0),  # exact
    "ft": ("length", 0.3048, 0.0),  # exact
    "°C": ("temperature", 1.0, 0.0),
    "°F": ("temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "K": ("temperature", 1.0, -273.15),
    "mg/dL": ("mass concentration", 1.0, 0.0),
    "mg/L": ("mass concentration", 0.1, 0.0),
    "g/L": ("mass concentration", 100.0, 0.0),
    "g/dL": ("mass concentration", 1000.0, 0.0),
    "mmol/L": ("amount concentration", 1.0, 0.0),
    "µmol/L": ("amount concentration", 1e-3, 0.0),
}
"""The units :func:`load_harmonization` converts between without an explicit ``factor``."""

SUBSTANCES: dict[str, float] = {
    "cholesterol": 38.67,
    "glucose": 18.016,
    "triglycerides": 88.57,
    "creatinine": 1000.0 / 88.42,  # 1 mg/dL = 88.42 µmol/L
}
"""mg/dL per mmol/L for the substances whose molar and mass concentrations convert without a
``factor`` (the conventional clinical factors: molar mass / 10)."""

_ALIASES = {
    "c": "°C", "degc": "°C", "celsius": "°C", "f": "°F", "degf": "°F", "fahrenheit": "°F",
    "kelvin": "K", "kgs": "kg", "kilogram": "kg", "kilograms": "kg", "lbs": "lb",
    "pound": "lb", "pounds": "lb", "gram": "g", "grams": "g", "inch": "in", "inches": "in",
    "metre": "m", "meter": "m", "feet": "ft", "foot": "ft", "umol/l": "µmol/L",
}


@dataclass(frozen=True)
class Conversion:
    """``to = from × factor + offset``; ``what`` says which, for messages; ``units`` are
    ``(from, to)`` when both are known units."""

    factor: float
    offset: float = 0.0
    what: str = ""
    units: tuple[str, str] | None = None


def canonical_unit(name: str, *, source: str = "", where: str = "unit") -> str:
    """``name`` as :data:`UNITS` spells it (``"mg/dl"``, ``"degF"``, ``"umol/l"`` are known).

    Raises:
        ConfigError: an unknown unit (the message names ``where`` in ``source``).
    """
    simple = name.strip().replace(" ", "").replace("μ", "µ").replace("°", "")
    for unit in UNITS:
        if unit.replace("°", "").lower() == simple.lower():
            return unit
    if simple.lower() in _ALIASES:
        return _ALIASES[simple.lower()]
    raise ConfigError(
        f"{source}: {where} = {name!r} is not a unit consortium knows ({', '.join(UNITS)}); "
        "use one of them, or give factor (and offset) for to = from × factor + offset"
    )


def conversion(
    unit_from: str, unit_to: str, substance: Any = None, *, source: str = "", where: str = "units"
) -> Conversion | None:
    """The conversion between two :data:`UNITS` keys (:func:`canonical_unit` spells them;
    None when they are the same); between mmol/L-type and mg/dL-type units it needs one of
    the :data:`SUBSTANCES`.

    Raises:
        ConfigError: units that measure different things, or a missing or unknown substance.
    """
    if unit_from == unit_to:
        return None
    dim_from, scale_from, offset_from = UNITS[unit_from]
    dim_to, scale_to, offset_to = UNITS[unit_to]
    per_mmol = 1.0  # mg/dL per mmol/L when crossing between amount and mass concentrations
    if dim_from != dim_to:
        if {dim_from, dim_to} != {"amount concentration", "mass concentration"}:
            raise ConfigError(
                f"{source}: [{where}] converts {unit_from} ({dim_from}) to {unit_to} ({dim_to}), "
                "which measure different things; fix the units or give factor and offset"
            )
        if substance not in SUBSTANCES:
            raise ConfigError(
                f"{source}: [{where}] converts {unit_from} to {unit_to}, which depends on the "
                f"substance; add substance = one of {', '.join(repr(s) for s in SUBSTANCES)} "
                "(or give factor and offset yourself: to = from × factor + offset)"
            )
        per_mmol = SUBSTANCES[substance]
        if dim_from == "mass concentration":
            per_mmol = 1.0 / per_mmol
    factor = scale_from * per_mmol / scale_to
    offset = (offset_from - offset_to) / scale_to
    what = f"{unit_from} → {unit_to}" + (f" ({substance})" if dim_from != dim_to else "")
    return Conversion(factor, offset, what, (unit_from, unit_to))


@functools.cache
def known_conversions() -> tuple[Conversion, ...]:
    """Every conversion between two :data:`UNITS` (per substance where one is needed) whose
    factor exceeds 1.5: the differences a unit mix-up makes visible."""
    found: list[Conversion] = []
    for a in UNITS:
        for b in UNITS:
            substances: list[str | None] = [None]
            if {UNITS[a][0], UNITS[b][0]} == {"amount concentration", "mass concentration"}:
                substances = list(SUBSTANCES)
            elif UNITS[a][0] != UNITS[b][0]:
                continue
            for substance in substances:
                conv = conversion(a, b, substance)
                if conv is not None and conv.factor > 1.5:
                    found.append(conv)
    return tuple(found)

