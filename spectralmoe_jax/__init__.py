"""SpectralMoE in JAX: dual-gated mixture-of-experts refinement of frozen foundation models
for domain-generalized semantic segmentation of spectral remote sensing imagery."""

__version__ = "0.1.0"
