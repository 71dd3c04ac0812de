"""The contract gateways and workers speak: requests, errors, audio formats, cache key."""
