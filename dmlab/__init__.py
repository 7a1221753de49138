"""dmlab: see, run and measure diffusion-model papers.

``import dmlab`` imports torch only; everything heavier is imported inside the functions that need it.
"""
__version__ = "0.1.0"
