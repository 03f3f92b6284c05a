"""Typed configurations: training jobs and sweeps (pydantic), YAML plus --set overrides."""
