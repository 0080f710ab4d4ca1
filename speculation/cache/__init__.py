"""Expert prefetch caching: a trace-driven simulator of offloaded-expert decode (issue #6)."""
