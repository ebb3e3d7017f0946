"""Launch the depthvlm node (and optionally RViz2) in a full ROS 2 install.

    ros2 launch depthvlm_ros depthvlm.launch.py image:=/camera/image_rect camera_info:=/camera/camera_info
    ros2 launch depthvlm_ros depthvlm.launch.py namespace:=front rviz:=true params_file:=/path/to/my.yaml
    ros2 launch depthvlm_ros depthvlm.launch.py model_path:=/models/DepthVLM-4B autostart:=false

Arguments: params_file (default: the package's config/depthvlm.yaml), model_path (a DepthVLM folder;
empty: the params file's, else the built-in model), image and camera_info (the camera topics the node's
``image`` / ``camera_info`` are remapped to), namespace, rviz (also start rviz2 with config/depthvlm.rviz),
use_compressed (subscribe to ``<image>/compressed`` instead of ``<image>``), autostart (true: the node
configures and activates itself; false: it waits unconfigured for a lifecycle manager, e.g. Nav2's
lifecycle_manager with node_names [depthvlm]), log_level, enclave (the node's SROS2 enclave on a
security-enabled install: ``/depthvlm/node`` of config/sros2_policy.xml; empty: none). Several cameras:
set ``cameras`` in the params file (each camera's topics live under its namespace; remap them there). The
Fast DDS large-data profile (config/fastdds_large_data.xml) is set for the launched processes unless
FASTDDS_DEFAULT_PROFILES_FILE is already set.
"""
# ruff: noqa: I001  (ruff takes the repo's launch/ folder for the `launch` package and mis-sorts its imports)

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node


def _depthvlm_node(context):
    """The node, with the launch arguments that override the params file (model_path only when given)."""
    image = LaunchConfiguration('image')
    overrides = {
        'use_compressed': LaunchConfiguration('use_compressed').perform(context) == 'true',
        'autostart': LaunchConfiguration('autostart').perform(context) == 'true',
    }
    model_path = LaunchConfiguration('model_path').perform(context)
    enclave = LaunchConfiguration('enclave').perform(context)
    if model_path:
        overrides['model_path'] = model_path
    return [Node(
        package='depthvlm_ros',
        executable='depthvlm_node',
        name='depthvlm',
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        emulate_tty=True,
        parameters=[LaunchConfiguration('params_file'), overrides],
        remappings=[
            ('image', image),
            ('image/compressed', [image, '/compressed']),
            ('camera_info', LaunchConfiguration('camera_info')),
        ],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')]
        + (['--enclave', enclave] if enclave else []),
    )]


def generate_launch_description():
    share = get_package_share_directory('depthvlm_ros')
    params_file = os.path.join(share, 'config/depthvlm.yaml')
    fastdds_profile = os.path.join(share, 'config/fastdds_large_data.xml')
    rviz_config = os.path.join(share, 'config/depthvlm.rviz')

    return LaunchDescription([
        DeclareLaunchArgument('params_file', default_value=params_file,
                              description='node parameters (YAML, /**/depthvlm: ros__parameters: ...)'),
        DeclareLaunchArgument('model_path', default_value='',
                              description='DepthVLM folder (safetensors); empty: the params file\'s (else built-in)'),
        DeclareLaunchArgument('autostart', default_value='true', choices=['true', 'false'],
                              description='configure and activate at start; false: wait for a lifecycle manager'),
        DeclareLaunchArgument('image', default_value='image',
                              description='camera image topic (rectified, e.g. /camera/image_rect)'),
        DeclareLaunchArgument('camera_info', default_value='camera_info',
                              description='camera_info topic of that image'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node and its topics'),
        DeclareLaunchArgument('rviz', default_value='false', choices=['true', 'false'],
                              description='also start rviz2 with config/depthvlm.rviz'),
        DeclareLaunchArgument('use_compressed', default_value='false', choices=['true', 'false'],
                              description='subscribe to <image>/compressed (JPEG/PNG) instead of <image>'),
        DeclareLaunchArgument('log_level', default_value='info', description='node log level'),
        DeclareLaunchArgument('enclave', default_value='',
                              description='SROS2 enclave of the node (e.g. /depthvlm/node; config/sros2_policy.xml)'),

        # Large depth images / clouds need Fast DDS's 64 MiB shared-memory transport (see the XML).
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE',
                               EnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', default_value=fastdds_profile)),

        OpaqueFunction(function=_depthvlm_node),

        Node(
            package='rviz2',
            executable='rviz2',
            name='rviz2',
            namespace=LaunchConfiguration('namespace'),
            arguments=['-d', rviz_config],
            output='screen',
            condition=IfCondition(LaunchConfiguration('rviz')),
        ),
    ])
