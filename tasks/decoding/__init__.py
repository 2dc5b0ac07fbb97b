"""Decoding algorithms: left-to-right generation and the masked-diffusion sampler."""
