"""Parallel runtime: process groups, the communicator, DP coordination, MoE dispatchers, launch."""
