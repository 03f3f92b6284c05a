"""octssl: self-supervised 3D-to-2D retinal OCT pretraining platform."""
__version__ = "0.1.0"
