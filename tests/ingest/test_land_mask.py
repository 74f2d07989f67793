"""The land mask of sampling: the same answers as ``global_land_mask``, in a ninth of the memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from global_land_mask import globe

from revisit.ingest.sampling import LandMask


def test_the_mask_answers_as_global_land_mask_does() -> None:
    mask = LandMask.load()
    assert mask.ocean_bits.shape == (21600, 5400)  # one bit per 1 km cell
    rng = np.random.default_rng(0)
    # Random points, and a grid over the edges and the cell boundaries, where truncation decides.
    lon_edges = np.concatenate([[-180.0, 180.0, 0.0, -0.004166, 179.99166667], mask.lon[::997]])
    lat_edges = np.concatenate([[-90.0, 90.0, 0.0, 45.004166, -89.99166667], mask.lat[::491]])
    grid_lon, grid_lat = np.meshgrid(lon_edges, lat_edges)
    lon = np.concatenate([rng.uniform(-180, 180, 200_000), grid_lon.ravel()])
    lat = np.concatenate([rng.uniform(-90, 90, 200_000), grid_lat.ravel()])
    np.testing.assert_array_equal(mask.is_land(lon, lat), globe.is_land(lat, lon))
    assert 0.2 < mask.is_land(lon, lat).mean() < 0.4  # about a third of the globe is land


_SAMPLE = """
import json, sys
from revisit.ingest.sampling import sample_locations
points = sample_locations(50, seed=1)
# VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec.
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({
    "n": len(points),
    "imported": any(m.startswith("global_land_mask") for m in sys.modules),
    "max_rss_mb": peak_kb / 1024,
}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_sampling_reads_the_mask_without_the_package_and_its_gigabyte() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SAMPLE], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout)
    assert report["n"] == 50
    assert not report["imported"]  # its import alone unpacks the 0.9 GB array
    assert report["max_rss_mb"] < 400, report
