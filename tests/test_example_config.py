"""The example labeling config shipped at the repository root parses into what the README promises."""
from pathlib import Path

from backend.studio.label_config import parse_label_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_bee_example_config_maps_to_prompts():
    config = parse_label_config((ROOT / "label_config.xml").read_text())
    assert config.problems == ()
    boxes, scene = config.controls
    assert boxes.type == "rectanglelabels" and boxes.labelset.labels == ("Bee", "Wasp")
    assert boxes.labelset.prompts[0] == ("a photo of a bee in flight.",)
    assert boxes.labelset.background == ("mostly background",)
    assert scene.type == "choices" and scene.labelset.background == () and not scene.labelset.multi_label
