"""DreamStereo: monocular video -> pseudo-stereo training data, stereo-inpainting training, fast inference."""

__version__ = "0.1.0"
