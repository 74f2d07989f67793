"""The web map of the change estimates, served by ``revisit run`` beside ``/healthz``.

- :mod:`revisit.web.api`: the JSON endpoints (``/api/changes``, ``/api/aois``,
  ``/api/locations/{id}/history``) and the dispatch of every web path;
- :mod:`revisit.web.static`: the page and its files (Leaflet vendored under
  ``static/vendor/leaflet``) from inside the package, so the map works offline.

docs/web-map.md describes what the map shows and every parameter.
"""
