"""The worker: loads one engine, warms it, and streams audio with bounded admission."""
