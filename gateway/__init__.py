"""The public face of the service: validation, the Redis audio cache and the relay to workers."""
