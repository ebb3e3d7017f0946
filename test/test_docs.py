"""The docs a newcomer reads: a short README, one page per topic, links that resolve, generated tables that
match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def test_the_readme_is_short_and_every_page_it_names_exists():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in ("node", "model", "backends", "serving", "training", "evaluation", "jetson", "testing", "benchmarks",
                 "security", "architecture"):
        assert f"docs/{page}.md" in text and (REPO / "docs" / f"{page}.md").is_file(), page


#: A page longer than this is an accident, not a document (6461828 wrote a CHANGELOG entry before every character
#: of the file: 7.3 MB, and every other check passed); the longest page, docs/benchmarks.md, is 38 KB.
MAX_PAGE_BYTES = 200_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_page_opens_with_its_title_and_stays_a_readable_size(page):
    data = page.read_bytes()
    assert len(data) <= MAX_PAGE_BYTES, f"{page.name}: {len(data)} bytes"
    assert data.startswith(b"# "), f"{page.name} does not open with its title: {data[:60]!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: {target}"


def test_the_node_page_holds_the_generated_parameter_table():
    from depthvlm_ros.ros.params import TABLE_BEGIN, TABLE_END, parameter_table

    text = (REPO / "docs" / "node.md").read_text()
    block = text[text.index(TABLE_BEGIN): text.index(TABLE_END) + len(TABLE_END)]
    assert block == parameter_table(), "regenerate: python -m depthvlm_ros.ros.params --docs docs/node.md"


def test_the_nav2_examples_parse_and_name_the_nodes_topics_and_parameters():
    """docs/nav2.md's YAML is valid, its costmap observes the node's cloud, its scan reads the node's depth,
    and every node parameter it sets exists."""
    import yaml

    from depthvlm_ros.ros.interfaces import ENDPOINTS, PUBLISH
    from depthvlm_ros.ros.params import PARAMS

    text = (REPO / "docs" / "nav2.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert len(blocks) == 3
    costmap, node, scan = blocks
    layer = costmap["local_costmap"]["local_costmap"]["ros__parameters"]["voxel_layer"]
    source = layer[layer["observation_sources"]]
    published = {e.name for e in ENDPOINTS if e.kind == PUBLISH}
    assert source["data_type"] == "PointCloud2" and source["topic"].removeprefix("/camera/") in published
    assert set(node["/camera/depthvlm"]["ros__parameters"]) <= {p.name for p in PARAMS}
    remaps = scan["depthimage_to_laserscan"]["remappings"]
    assert {remaps["depth"], remaps["depth_camera_info"]} == {"/camera/depth/image", "/camera/depth/camera_info"}
    assert {t.removeprefix("/camera/") for t in (remaps["depth"], remaps["depth_camera_info"])} <= published

