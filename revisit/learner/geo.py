"""Geo-location clusters for GASSL's ``geo-tp``: K-means over location coordinates.

Coordinates are clustered as unit vectors on the sphere, so clusters do not
tear at the antimeridian and a degree of longitude near the poles does not
weigh as much as one at the equator. Pure: arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def unit_vectors(lon: npt.ArrayLike, lat: npt.ArrayLike) -> FloatArray:
    """(N, 3) unit vectors of longitudes and latitudes in degrees."""
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1)


def fit_geo_clusters(
    lon: npt.ArrayLike, lat: npt.ArrayLike, *, k: int, seed: int = 0
) -> FloatArray:
    """K-means centroids (≤ k, 3) of the locations; fewer when there are fewer distinct points.

    Raises:
        ValueError: No locations, or k < 1.
    """
    xyz = unit_vectors(lon, lat)
    if xyz.shape[0] == 0:
        raise ValueError("no locations to cluster")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n_clusters = min(k, int(np.unique(xyz.round(12), axis=0).shape[0]))
    km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed)
    km.fit(xyz)
    centroids: FloatArray = np.asarray(km.cluster_centers_, dtype=np.float64)
    return centroids


def assign_geo_clusters(lon: npt.ArrayLike, lat: npt.ArrayLike, centroids: FloatArray) -> IntArray:
    """Index of the nearest centroid of each location."""
    xyz = unit_vectors(lon, lat)
    if xyz.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    d = ((xyz[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    out: IntArray = d.argmin(axis=1).astype(np.int64)
    return out
