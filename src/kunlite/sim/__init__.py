"""The cluster simulator's leaf modules: device and link models, step costs, traces, model
configs and the engine profiler. Everything here except `profile` is pure (numbers in,
numbers out) and runs without a model or a device.
"""
