"""The local cluster launcher behind `make up`: Redis, workers, nginx and gateways."""
