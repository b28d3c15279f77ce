"""What both sides of a federated round share, and nothing of the model (DESIGN.md section 1).

Protocol keys and the round config (:mod:`federation.protocol`), model tensors ↔ packed arrays
(:mod:`federation.arrays`), Flower record conversion (:mod:`federation.records`), example-weighted
metric means (:mod:`federation.metrics`), Flower patching and transport constants
(:mod:`federation.patching`, :mod:`federation.transport`) and process control
(:mod:`federation.processes`). Imports flwr, numpy, torch (tensors ↔ arrays only) and privacy; never
client/ or server/.
"""
