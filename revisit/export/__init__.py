"""Exports of what revisit learned (DESIGN §5).

- :mod:`revisit.export.onnx`: the encoder as ONNX models, their metadata and the
  parity check against PyTorch.
- :mod:`revisit.export.publish`: versioned, hashed, atomic publishing of those
  models under ``<data_dir>/exports/onnx`` with ``artifact`` rows and ``latest.json``.
- :mod:`revisit.export.changemap`: change maps (GeoJSON, COG, quicklook).
"""
