"""The node's interface table (ros/interfaces.py) against the node itself, and the SROS2 policy made from it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from depthvlm_ros.ros.interfaces import graph_names, node_endpoints, sros2_policy

from conftest import REPO
from test_ros_node import TEST_PARAMS, NodeProcess, peer


@pytest.mark.parametrize(("cameras", "compressed"), [("[left, right]", False), ("[]", True)])
def test_the_table_lists_exactly_what_the_node_creates(ros_env, tiny_checkpoint, cameras, compressed):
    """Every topic, service and action of a running node, and nothing else, is in the table the policy is
    generated from (two named cameras; one camera on compressed input)."""
    names = [c.strip() for c in cameras.strip("[]").split(",") if c.strip()]
    table = graph_names(node_endpoints(names, compressed))
    node = NodeProcess(ros_env, {"model_path": tiny_checkpoint, **TEST_PARAMS, "cameras": cameras,
                                 "use_compressed": compressed})
    try:
        node.wait_ready()
        # waits until every name of the table is discovered (a missing one fails with the names it saw)
        expect = [a for kind in table.values() for n in sorted(kind) for a in ("--expect", n)]
        seen = peer(ros_env, "graph", *expect)
    finally:
        assert node.stop() == 0, node.output[-2000:]
    for kind in ("publish", "subscribe", "service"):
        assert set(seen[kind]) == table[kind], (kind, set(seen[kind]) ^ table[kind])


def test_the_shipped_policy_is_the_generated_one_and_says_who_may_do_what():
    text = (REPO / "config" / "sros2_policy.xml").read_text()
    assert text == sros2_policy(), "regenerate: python -m depthvlm_ros.ros.interfaces > config/sros2_policy.xml"
    root = ET.fromstring(text)
    enclaves = {e.get("path"): e for e in root.iter("enclave")}
    assert set(enclaves) == {"/depthvlm/node", "/depthvlm/robot", "/depthvlm/operator"}

    def allowed(enclave: str, tag: str, attr: str) -> set[str]:
        return {item.text for group in enclaves[enclave].iter(tag) if group.get(attr) == "ALLOW" for item in group}

    table = graph_names(node_endpoints())
    assert allowed("/depthvlm/node", "topics", "publish") == table["publish"] - {
        n for n in table["publish"] if "/_action/" in n}
    assert allowed("/depthvlm/node", "actions", "execute") == {"/depthvlm/ask"}
    robot = allowed("/depthvlm/robot", "services", "request")
    operator = allowed("/depthvlm/operator", "services", "request")
    assert {"/depthvlm/spatial_query", "/depthvlm/depth_at", "/depthvlm/get_state"} <= robot
    assert not {"/depthvlm/change_state", "/depthvlm/set_parameters", "/depthvlm/set_parameters_atomically"} & robot
    assert {"/depthvlm/change_state", "/depthvlm/set_parameters"} <= operator and robot <= operator
    assert "/depth/image" in allowed("/depthvlm/robot", "topics", "subscribe")
    assert "/image" not in allowed("/depthvlm/robot", "topics", "subscribe")  # the camera's, not the robot's
