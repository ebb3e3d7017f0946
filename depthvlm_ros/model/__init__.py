"""DepthVLM the model: stock Qwen3-VL + DPT head, its processor, and strict loading.

The end-to-end pipeline around it (camera plans, backends) is :mod:`depthvlm_ros.pipeline`.
"""

from depthvlm_ros.model.loading import LoadedModel, load_depthvlm
from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

__all__ = ["DepthVLMForConditionalGeneration", "LoadedModel", "load_depthvlm"]
