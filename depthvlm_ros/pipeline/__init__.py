"""DepthVLM end to end: a camera's plan around the model and a backend (the layer above both).

``DepthVLM`` holds the loaded model, its processor and the depth backend; a camera's
:class:`CameraPlan` is the straight line a frame takes: ``prepare -> backend.depth -> restore``.
"""

from depthvlm_ros.pipeline.depthvlm import STAGES, Answer, DepthResult, DepthVLM
from depthvlm_ros.pipeline.plan import (
    DEFAULT_ROUTE,
    CameraPlan,
    ImagePlan,
    RouteSettings,
    image_plan,
    model_input_size,
)

__all__ = ["DEFAULT_ROUTE", "STAGES", "Answer", "CameraPlan", "DepthResult", "DepthVLM", "ImagePlan", "RouteSettings",
           "image_plan", "model_input_size"]
