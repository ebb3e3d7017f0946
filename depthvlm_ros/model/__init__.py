"""DepthVLM: the model (stock Qwen3-VL + DPT head) and the end-to-end pipeline around it."""

from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration
from depthvlm_ros.model.pipeline import Answer, DepthResult, DepthVLM

__all__ = ["Answer", "DepthResult", "DepthVLM", "DepthVLMForConditionalGeneration"]
