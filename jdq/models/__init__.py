"""Diffusion transformers (DiT, PixArt-Σ, SD3 MMDiT) and the SD VAE as pure functions of params."""
