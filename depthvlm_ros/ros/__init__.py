"""ROS 2 layer: adapts messages to the array functions of :mod:`depthvlm_ros.geometry` and friends.

Only this package imports rclpy and ROS message types; everything it calls is testable without ROS.
"""
