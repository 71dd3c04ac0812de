"""The contract the gateway and the workers speak: request models, errors, audio formats, cache key."""
