"""Process set-up shared by every ROS entry point: the Fast DDS profile, rclpy start and clean exit."""

from __future__ import annotations

import os
from pathlib import Path

#: The shipped Fast DDS profile (64 MiB shared-memory segment; see the file's comment).
FASTDDS_PROFILE = "fastdds_large_data.xml"


def config_path(name: str) -> Path:
    """A file of the package's ``config/`` folder: from a source checkout or an installed share dir."""
    here = Path(__file__).resolve().parents[2] / "config" / name
    if here.exists():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory

        shared = Path(get_package_share_directory("depthvlm_ros")) / "config" / name
        if shared.exists():
            return shared
    except (ImportError, LookupError, ValueError):
        pass
    import sys

    return Path(sys.prefix) / "share" / "depthvlm_ros" / "config" / name


def use_large_data_profile() -> str | None:
    """Point Fast DDS at the shipped profile unless the user chose a profile or another RMW.

    Must run before ``rclpy.init()`` (Fast DDS reads the variable when the participant is made).
    Returns the profile in effect, or None when another RMW is selected.
    """
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw.startswith("rmw_fastrtps"):
        return None
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ:
        path = config_path(FASTDDS_PROFILE)
        if path.exists():
            os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    return os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")
