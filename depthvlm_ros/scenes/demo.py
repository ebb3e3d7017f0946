"""The live demo's scripted questions: about the frame in view, in turn how far, where and which is closer,
naming the biggest objects (``depthvlm demo``; pure: no ROS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The demo's questions in turn (kinds of :mod:`depthvlm_ros.scenes.qa`): how far, where, which is closer.
DEMO_QUESTION_KINDS = ("distance", "where", "closer")


@dataclass
class DemoQuestion:
    """A scripted question about the frame in view when it was asked."""

    kind: str  # one of DEMO_QUESTION_KINDS
    question: str
    objects: list[Any]  # the named objects' ObjectLabels (closer: both)
    view: Any  # the Rendering in view when asked

    @property
    def target(self) -> Any:
        """The object the answer should point at (closer: the nearer one)."""
        return min(self.objects, key=lambda lab: lab.distance_m)


def pick_question(view: Any, number: int) -> DemoQuestion | None:
    """Question ``number`` (0, 1, ...) about the frame ``view``: its kind cycles through
    :data:`DEMO_QUESTION_KINDS`; it names the biggest objects in view (the n-th question of a kind the
    n-th biggest), with the generator's first template of that kind."""
    from depthvlm_ros.scenes.qa import TEMPLATES, askable

    k = view.intrinsics
    objects = sorted(askable(view.labels, k.width, k.height), key=lambda lab: -lab.visible_px)
    kind = DEMO_QUESTION_KINDS[number % len(DEMO_QUESTION_KINDS)]
    turn = number // len(DEMO_QUESTION_KINDS)
    template = TEMPLATES[kind][0]
    if kind != "closer":
        if not objects:
            return None
        a = objects[turn % len(objects)]
        return DemoQuestion(kind, template.format(a=a.label), [a], view)
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]
             if max(a.distance_m, b.distance_m) >= 1.2 * min(a.distance_m, b.distance_m)]  # clearly closer
    if not pairs:
        return None
    a, b = pairs[turn % len(pairs)]
    return DemoQuestion(kind, template.format(a=a.label, b=b.label), [a, b], view)
