"""
Observability: what a daemon's migration did, read from the engine's
existing counters (L{counters}), a bounded timeline of it (L{timeline}),
Prometheus metrics (L{metrics}), live progress (L{watch}) and plots
(L{plots}).  See C{docs/observability.md}.
"""
