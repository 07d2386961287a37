"""offroadseg: offroad desert semantic segmentation (Duality AI Falcon layout).

One module per concept: classes, data, synth, scan, metrics, models, losses,
augment, engine, ... Notebooks under notebooks/ are thin callers of this package.
"""

__version__ = "0.1.0"
