"""Label Studio itself accepts our configs and their model_* attributes (it validates on project creation)."""
from pathlib import Path

from backend.studio.label_config import parse_label_config

ROOT = Path(__file__).resolve().parents[2]


def test_label_studio_accepts_the_example_config(label_studio):
    xml = (ROOT / "label_config.xml").read_text()
    project = label_studio.create_project("bees", xml)
    assert "model_prompt" in label_studio.project(project["id"])["label_config"]


def test_label_studio_accepts_per_label_score_thresholds(label_studio):
    xml = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image" model_score_threshold="0.3">
        <Label value="Bee" model_score_threshold="0.8"/><Label value="Wasp"/>
      </RectangleLabels>
      <Choices name="scene" toName="image">
        <Choice value="Indoor" model_score_threshold="0.6"/><Choice value="Outdoor"/>
      </Choices></View>"""
    project = label_studio.create_project("per-label thresholds", xml)
    stored = parse_label_config(label_studio.project(project["id"])["label_config"])
    assert [c.labelset.minimums() for c in stored.controls] == [(0.8, 0.3), (0.6, 0.0)]
