"""Programs the tests start in their own processes: the ROS peer (cameras, listeners, service and action
clients), the ROS tools' listener, and a Triton model that misbehaves on purpose. Each runs as a script
(``python test/peers/NAME.py``); ``depthvlm_ros`` comes from the installed package (``make setup``)."""
