"""Reproducible measurements (not tests): each script runs the VAE baseline in the same process."""
