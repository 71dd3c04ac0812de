"""Load tests for the speech service: k6 and wrk scripts, and a speech benchmark runner."""
