"""What the node creates on the ROS graph (one table), and the SROS2 access-control policy made from it.

The table lists every topic, service and action the ``depthvlm`` node has: its own (per camera, and the
node's private ones) and the standard ones rclpy gives every lifecycle node (parameters, lifecycle, logs,
type descriptions). A test starts the node and compares its graph with this table name for name, so the
policy cannot drift from the code.

``python -m depthvlm_ros.ros.interfaces [--cameras front,left] [--compressed] > policy.xml`` writes the
policy (``config/sros2_policy.xml`` is the one for the default single camera; a test keeps them equal).
Its enclaves say who may do what:

- ``/depthvlm/node``: the node itself (publishes its outputs, subscribes to its camera, answers its
  services and action);
- ``/depthvlm/robot``: software that uses the depth (subscribes to the outputs and diagnostics; may ask
  questions and read depth at pixels); it may not change the node's state or parameters;
- ``/depthvlm/operator``: a lifecycle manager or an operator's console: all the robot's rights, plus
  ``change_state`` and the parameter services.

SROS2 enforcement needs a ROS install with DDS-Security (``ros2 security``); the PyPI Fast DDS has none,
so here the policy is generated and checked, not enforced (the README's "Security" section).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from xml.sax.saxutils import escape

from depthvlm_ros.ros.intake import topic

NODE_NAME = "depthvlm"
PUBLISH, SUBSCRIBE, SERVICE, ACTION = "publish", "subscribe", "service", "action"


@dataclass(frozen=True)
class Endpoint:
    """One thing of the node on the graph. ``name``: relative (``depth/image``: in the node's namespace,
    under each camera's with ``per_camera``), private (``~/spatial_query``) or absolute (``/diagnostics``)."""

    kind: str  # publish, subscribe, service, action
    name: str
    type: str
    per_camera: bool = False
    standard: bool = False  # every rclpy lifecycle node has it (parameters, lifecycle, logging)
    reader: str = "robot"  # who else may use it: robot (and operator), operator only, or nobody else


#: The node's endpoints; ``image`` is ``image/compressed`` with ``use_compressed``.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(SUBSCRIBE, "image", "sensor_msgs/msg/Image", per_camera=True, reader="camera"),
    Endpoint(SUBSCRIBE, "camera_info", "sensor_msgs/msg/CameraInfo", per_camera=True, reader="camera"),
    Endpoint(PUBLISH, "depth/image", "sensor_msgs/msg/Image", per_camera=True),
    Endpoint(PUBLISH, "depth/image/compressedDepth", "sensor_msgs/msg/CompressedImage", per_camera=True),
    Endpoint(PUBLISH, "depth/camera_info", "sensor_msgs/msg/CameraInfo", per_camera=True),
    Endpoint(PUBLISH, "depth/colored", "sensor_msgs/msg/Image", per_camera=True),
    Endpoint(PUBLISH, "points", "sensor_msgs/msg/PointCloud2", per_camera=True),
    Endpoint(PUBLISH, "/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
    Endpoint(PUBLISH, "~/answer_markers", "visualization_msgs/msg/MarkerArray"),
    Endpoint(PUBLISH, "~/answers", "depthvlm_msgs/msg/Answer"),
    Endpoint(SERVICE, "~/spatial_query", "depthvlm_msgs/srv/SpatialQuery"),
    Endpoint(SERVICE, "~/depth_at", "depthvlm_msgs/srv/DepthAt"),
    Endpoint(ACTION, "~/ask", "depthvlm_msgs/action/Ask"),
    # what rclpy gives every lifecycle node
    Endpoint(PUBLISH, "/rosout", "rcl_interfaces/msg/Log", standard=True, reader="nobody"),
    Endpoint(PUBLISH, "/parameter_events", "rcl_interfaces/msg/ParameterEvent", standard=True),
    Endpoint(PUBLISH, "~/transition_event", "lifecycle_msgs/msg/TransitionEvent", standard=True),
    Endpoint(SERVICE, "~/get_type_description", "type_description_interfaces/srv/GetTypeDescription",
             standard=True),
    *(Endpoint(SERVICE, f"~/{name}", f"rcl_interfaces/srv/{kind}", standard=True,
               reader="robot" if name in ("describe_parameters", "get_parameter_types", "get_parameters",
                                          "list_parameters") else "operator")
      for name, kind in (("describe_parameters", "DescribeParameters"),
                         ("get_parameter_types", "GetParameterTypes"), ("get_parameters", "GetParameters"),
                         ("list_parameters", "ListParameters"), ("set_parameters", "SetParameters"),
                         ("set_parameters_atomically", "SetParametersAtomically"))),
    *(Endpoint(SERVICE, f"~/{name}", f"lifecycle_msgs/srv/{kind}", standard=True,
               reader="operator" if name == "change_state" else "robot")
      for name, kind in (("change_state", "ChangeState"), ("get_state", "GetState"),
                         ("get_available_states", "GetAvailableStates"),
                         ("get_available_transitions", "GetAvailableTransitions"),
                         ("get_transition_graph", "GetAvailableTransitions"))),
)
#: What one action is on the graph (services, then topics), relative to its name.
ACTION_PARTS = (("_action/send_goal", SERVICE), ("_action/cancel_goal", SERVICE), ("_action/get_result", SERVICE),
                ("_action/feedback", PUBLISH), ("_action/status", PUBLISH))


def fully_qualified(name: str, namespace: str = "/", node: str = NODE_NAME) -> str:
    """A relative, private or absolute name as ROS resolves it for the node ``namespace/node``."""
    ns = namespace.rstrip("/")
    if name.startswith("/"):
        return name
    if name.startswith("~/"):
        return f"{ns}/{node}/{name[2:]}"
    return f"{ns}/{name}"


def node_endpoints(cameras: list[str] | tuple[str, ...] = (), use_compressed: bool = False) -> list[Endpoint]:
    """The table for a node with these cameras (``[]``: one camera on the plain names)."""
    out = []
    for e in ENDPOINTS:
        name = "image/compressed" if (e.name == "image" and use_compressed) else e.name
        kind = "sensor_msgs/msg/CompressedImage" if name == "image/compressed" else e.type
        if e.per_camera:
            out += [Endpoint(e.kind, topic(camera, name), kind, True, e.standard, e.reader)
                    for camera in cameras or [""]]
        else:
            out.append(Endpoint(e.kind, name, kind, False, e.standard, e.reader))
    return out


def graph_names(endpoints: list[Endpoint], namespace: str = "/") -> dict[str, set[str]]:
    """The fully qualified names the graph shows for the node: ``publish``, ``subscribe``, ``service`` (actions
    expanded into their services and topics)."""
    out: dict[str, set[str]] = {PUBLISH: set(), SUBSCRIBE: set(), SERVICE: set()}
    for e in endpoints:
        name = fully_qualified(e.name, namespace)
        if e.kind == ACTION:
            for part, kind in ACTION_PARTS:
                out[kind].add(f"{name}/{part}")
        else:
            out[e.kind].add(name)
    return out


def _section(tag: str, item: str, attrs: str, names: list[str], indent: str) -> list[str]:
    if not names:
        return []
    return ([f"{indent}<{tag} {attrs}>"] + [f"{indent}  <{item}>{escape(n)}</{item}>" for n in sorted(set(names))]
            + [f"{indent}</{tag}>"])


def _profile(node: str, namespace: str, sections: list[tuple[str, str, str, list[str]]]) -> list[str]:
    lines = [f'        <profile ns="{escape(namespace)}" node="{escape(node)}">']
    for tag, item, attrs, names in sections:
        lines += _section(tag, item, attrs, names, "          ")
    return lines + ["        </profile>"]


def sros2_policy(cameras: list[str] | tuple[str, ...] = (), use_compressed: bool = False, namespace: str = "/",
                 root: str = "/depthvlm") -> str:
    """The SROS2 policy (version 0.2.0) of a node with these cameras; see the module docstring."""
    eps = node_endpoints(cameras, use_compressed)

    def names(kind: str, readers: tuple[str, ...] | None = None) -> list[str]:
        return [fully_qualified(e.name, namespace) for e in eps if e.kind == kind
                and (readers is None or e.reader in readers)]

    node = _profile(NODE_NAME, namespace, [
        ("topics", "topic", 'publish="ALLOW"', names(PUBLISH)),
        ("topics", "topic", 'subscribe="ALLOW"', names(SUBSCRIBE)),
        ("services", "service", 'reply="ALLOW"', names(SERVICE)),
        ("actions", "action", 'execute="ALLOW"', names(ACTION)),
    ])
    clients = []
    for who, readers in (("robot", ("robot",)), ("operator", ("robot", "operator"))):
        clients.append((who, _profile(who, "/", [
            ("topics", "topic", 'publish="ALLOW"', ["/rosout"]),
            ("topics", "topic", 'subscribe="ALLOW"', names(PUBLISH, readers)),
            ("services", "service", 'request="ALLOW"', names(SERVICE, readers)),
            ("actions", "action", 'call="ALLOW"', names(ACTION, readers)),
        ])))
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             "<!-- Generated by python -m depthvlm_ros.ros.interfaces from the node's interface table "
             f"(cameras: {', '.join(cameras) or 'one, plain names'}{'; compressed input' if use_compressed else ''}"
             "). Do not edit: generate it again. -->",
             '<policy version="0.2.0">', "  <enclaves>"]
    for path, profile in ((f"{root}/node", node), *((f"{root}/{who}", p) for who, p in clients)):
        lines += [f'    <enclave path="{escape(path)}">', "      <profiles>", *profile, "      </profiles>",
                  "    </enclave>"]
    return "\n".join(lines + ["  </enclaves>", "</policy>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m depthvlm_ros.ros.interfaces``: the node's SROS2 policy (enclaves node, robot, operator) for
    ``--cameras``, ``--compressed`` and ``--namespace``, written to stdout (exit code 0)."""
    parser = argparse.ArgumentParser(prog="python -m depthvlm_ros.ros.interfaces",
                                     description="Write the node's SROS2 policy (enclaves node, robot, operator).")
    parser.add_argument("--cameras", default="", help="comma list, as the cameras parameter (default: one camera)")
    parser.add_argument("--compressed", action="store_true", help="as with use_compressed")
    parser.add_argument("--namespace", default="/", help="the node's namespace (default /)")
    args = parser.parse_args(argv)
    cameras = [c for c in args.cameras.split(",") if c]
    sys.stdout.write(sros2_policy(cameras, args.compressed, args.namespace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
