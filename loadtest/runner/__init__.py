"""A speech benchmark runner: concurrency sweeps over one or two targets, side by side.

Run it as `python -m loadtest.runner --help`. It measures what matters for speech (time to
first audio, total latency, requests/s, audio-seconds/s, real-time factor, cache hit ratio,
errors by status) and writes JSON and a PNG plot.
"""
