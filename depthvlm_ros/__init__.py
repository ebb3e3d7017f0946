"""depthvlm_ros: metric depth, point clouds and spatial answers from one camera with DepthVLM."""

__version__ = "0.1.0"
