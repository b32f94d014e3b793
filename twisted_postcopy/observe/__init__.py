"""
Observability: what a daemon's migration did, read from the engine's
existing counters (L{twisted_postcopy.observe.counters}), a bounded timeline
of it (L{twisted_postcopy.observe.timeline}), Prometheus metrics
(L{twisted_postcopy.observe.metrics}), live progress
(L{twisted_postcopy.observe.watch}) and plots (L{twisted_postcopy.observe.plots}).
See C{docs/observability.md}.
"""
