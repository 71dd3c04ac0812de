"""Helpers that start real processes on free loopback ports and wait until they are ready."""
