"""The simulated world behind the ``simulated`` source: pure numpy, no state, no network.

Every pixel is a deterministic function of (seed, location, day, satellite):

- :mod:`seeding`: stable hashes to numpy generators;
- :mod:`spectra`: endmember reflectance spectra over the 12 canonical bands;
- :mod:`landcover`: classes and each location's profile (climate, mix);
- :mod:`texture`: noise, parcels, rivers, street grids;
- :mod:`layout`: a location's segments (fields, stands, buildings, water);
- :mod:`events`: planted change (construction, clearing, flooding);
- :mod:`phenology`: seasons, crop calendars, leaf-off, snow;
- :mod:`atmosphere`: sun, terrain, haze, water vapour, clouds, shadows;
- :mod:`sensor`: misregistration, native resolutions, noise, DN;
- :mod:`orbit`: tiles, Sentinel-2A/B acquisition times, scene weather;
- :mod:`render`: one chip of one location on one pass.
"""

from __future__ import annotations

from revisit.ingest.simworld.events import CLEARING, CONSTRUCTION, FLOODING, ChangeEvent
from revisit.ingest.simworld.landcover import CLASS_NAMES, LocationProfile, draw_profile
from revisit.ingest.simworld.orbit import (
    Acquisition,
    SceneWeather,
    Tile,
    acquisitions,
    scene_weather,
    tile_of,
)
from revisit.ingest.simworld.render import LocationWorld, render_chip, world_for

__all__ = [
    "CLASS_NAMES",
    "CLEARING",
    "CONSTRUCTION",
    "FLOODING",
    "Acquisition",
    "ChangeEvent",
    "LocationProfile",
    "LocationWorld",
    "SceneWeather",
    "Tile",
    "acquisitions",
    "draw_profile",
    "render_chip",
    "scene_weather",
    "tile_of",
    "world_for",
]
