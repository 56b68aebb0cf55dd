"""Typed configuration of the core: one small pydantic model per component, defaults from the papers.

How a run's stages are spread over threads, Dask, Ray or torchrun ranks, and where credentials come from, is the
stage layer's (`tasks.config`, which also assembles the whole run's `PipelineConfig` and reads presets).
"""
from .base import PROJECT_DIR, ConfigError, GuidanceScales, resolve_path, stable_hash
from .data import DataConfig, PairsConfig, RealDataConfig, TeacherConfig
from .distill import PHASE_FIELDS, DistillConfig, GANConfig, PhaseConfig, PhaseGANConfig
from .evaluate import EvaluateConfig, ExportConfig

__all__ = ["PROJECT_DIR", "ConfigError", "GuidanceScales", "resolve_path", "stable_hash", "DataConfig", "PairsConfig",
           "RealDataConfig", "TeacherConfig", "PHASE_FIELDS", "DistillConfig", "GANConfig", "PhaseConfig",
           "PhaseGANConfig", "EvaluateConfig", "ExportConfig"]
